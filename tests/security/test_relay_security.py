"""The relay with TLS, mutual TLS and credentials, over real loopback sockets.

Each rule is exercised accepted and refused; a refused client gets the rule's
sentence as ``Refused`` (the CLI's exit status 1) and never retries; refusals
are counted by reason. The attacks the issue measured (a second identity
injecting into a live stream, joining a group it was not given) fail, and the
real clients lose nothing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from security_support import TOKENS, Site, credentials_toml, refused, write

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.certs import issue
from audiosockets.client import Publisher, RetryPolicy, Subscriber, fetch_status
from audiosockets.errors import Refused, RelayUnreachable
from audiosockets.metrics import Metrics
from audiosockets.relay import Relay, RelayConfig
from audiosockets.relay.access import AuthThrottle, TLSListener
from audiosockets.tls import client_context, server_context

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


def block(value: int) -> np.ndarray:
    return np.full((320, 1), value, dtype=np.int16)


def count(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.toml"
    path.write_text(credentials_toml())
    return path


@pytest.fixture
async def relay(site: Site, credentials_file: Path) -> AsyncIterator[Relay]:
    """A relay with TLS, mutual TLS and the site's credentials."""
    tls = server_context(cert=site.relay.cert, key=site.relay.key, client_ca=site.ca)
    config = RelayConfig(
        host="127.0.0.1", port=0, heartbeat_interval=1.0, tls=tls, credentials=credentials_file
    )
    r = Relay(config, metrics=Metrics())
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def tls(site: Site) -> ssl.SSLContext:
    """A client of the site: trusts its CA, presents its client certificate."""
    return client_context(ca=site.ca, cert=site.client.cert, key=site.client.key)


def publisher(relay: Relay, tls: ssl.SSLContext, who: str, name: str | None = None) -> Publisher:
    return Publisher(
        relay.url, name=name or who, token=TOKENS[who], tls=tls, retry=FAST_RETRY, metrics=Metrics()
    )


def subscriber(
    relay: Relay, tls: ssl.SSLContext, who: str, pattern: str = "mic-*", group: str = ""
) -> Subscriber:
    return Subscriber(
        relay.url,
        pattern,
        group=group,
        name=who,
        token=TOKENS[who],
        tls=tls,
        retry=FAST_RETRY,
        metrics=Metrics(),
        start="earliest",
    )


# -- TLS and mutual TLS ------------------------------------------------------------------------


async def test_mutual_tls_session_carries_audio(relay: Relay, tls: ssl.SSLContext) -> None:
    assert relay.url.startswith("tls://")
    sub = subscriber(relay, tls, "listener")
    await sub.start()
    assert await sub.wait_connected(5)
    pub = publisher(relay, tls, "rec-1")
    stream = pub.stream("mic-1", FMT)
    await pub.start()
    for seq in range(20):
        stream.send(block(seq), captured_ns=time.time_ns())
    got = [await sub.get(5) for _ in range(20)]
    assert [c.seq for c in got] == list(range(20))
    assert [int(c.samples[0, 0]) for c in got] == list(range(20))
    await pub.close()
    await sub.close()


async def test_a_client_without_a_certificate_is_refused(relay: Relay, site: Site) -> None:
    no_cert = client_context(ca=site.ca)
    with pytest.raises(Refused, match="a client certificate is required"):
        await fetch_status(relay.url, token=TOKENS["ops"], tls=no_cert)
    assert count(relay, "audiosockets_refusals_total", reason="certificate_required") == 1


async def test_a_client_certificate_from_another_ca_is_refused(relay: Relay, site: Site) -> None:
    stranger = client_context(ca=site.ca, cert=site.stranger.cert, key=site.stranger.key)
    with pytest.raises(Refused, match="did not accept our client certificate"):
        await fetch_status(relay.url, token=TOKENS["ops"], tls=stranger)
    pub = Publisher(relay.url, name="x", token=TOKENS["rec-1"], tls=stranger, retry=FAST_RETRY)
    pub.stream("mic-1", FMT)
    await refused(pub)
    assert (
        count(
            relay,
            "audiosockets_tls_handshake_failures_total",
            reason="client_certificate_untrusted",
        )
        == 2
    )
    assert relay.streams == {}


async def test_a_relay_the_client_does_not_trust_is_refused(relay: Relay, site: Site) -> None:
    wrong_ca = client_context(ca=site.other_ca, cert=site.client.cert, key=site.client.key)
    with pytest.raises(Refused, match=r"is not trusted: .*--tls-ca"):
        await fetch_status(relay.url, token=TOKENS["ops"], tls=wrong_ca)
    # The system trust store does not know the site CA either.
    with pytest.raises(Refused, match="is not trusted"):
        await fetch_status(relay.url, token=TOKENS["ops"])


async def test_the_relay_host_name_is_checked(site: Site, tls: ssl.SSLContext) -> None:
    """A certificate of the site's CA, but for another host: refused by name."""
    other = issue(site.home, "elsewhere", dns=["elsewhere.example"])
    config = RelayConfig(
        host="127.0.0.1", port=0, tls=server_context(cert=other.cert, key=other.key)
    )
    async with Relay(config, metrics=Metrics()) as relay:
        with pytest.raises(Refused, match=r"is not trusted: .*(mismatch|elsewhere)") as caught:
            await fetch_status(relay.url, tls=tls)
    # The CA was given and is right: the sentence is about the name, not --tls-ca.
    message = str(caught.value)
    assert "its certificate does not name 127.0.0.1" in message
    assert "certs issue DIR NAME --ip 127.0.0.1" in message
    assert "--tls-ca" not in message


async def test_a_client_hello_sent_before_the_relay_gets_to_the_connection_is_not_lost(
    relay: Relay, tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the relay reaches a new connection late, after the ClientHello
    arrived; the handshake must still complete (with a plain reader first and
    ``start_tls`` after, it stalled until timeout)."""
    listener = relay._server
    assert isinstance(listener, TLSListener)
    serve = listener._serve

    async def late(conn: socket.socket, address: str) -> None:
        await asyncio.sleep(0.3)  # pacing: the client's ClientHello is in the socket by now
        await serve(conn, address)

    monkeypatch.setattr(listener, "_serve", late)
    for _ in range(3):
        report = await fetch_status(relay.url, token=TOKENS["ops"], tls=tls, timeout=3)
        assert report["streams"] == []


async def test_plain_tcp_on_the_tls_port_is_cut_and_counted(relay: Relay) -> None:
    assert relay.address is not None
    url = f"tcp://127.0.0.1:{relay.address.port}"
    with pytest.raises(RelayUnreachable, match="if the relay serves TLS, connect to tls://"):
        await fetch_status(url, token=TOKENS["ops"])
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.address.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # cut, nothing answered
    writer.close()
    await wait_until(
        lambda: count(relay, "audiosockets_tls_handshake_failures_total", reason="not_tls") == 2,
        what="both plain connections counted",
    )
    assert relay.sessions == set()


# -- roles, streams, groups ---------------------------------------------------------------------


async def test_bad_token_is_refused_slowed_and_counted(relay: Relay, tls: ssl.SSLContext) -> None:
    relay.access.throttle = AuthThrottle(base=0.05, cap=0.4)
    times = []
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(Refused, match="bad token"):
            await fetch_status(relay.url, token="guess", tls=tls)
        times.append(time.monotonic() - started)
    assert count(relay, "audiosockets_refusals_total", reason="bad_token") == 5
    assert count(relay, "audiosockets_auth_failures_total") == 5
    # 0.05, 0.1, 0.2, 0.4, 0.4 s of delay before each answer.
    assert times[0] < 0.4
    assert times[3] >= 0.4
    assert times[4] >= 0.4


async def test_roles_allow_and_refuse(relay: Relay, tls: ssl.SSLContext) -> None:
    # admin reads the status; a subscriber and a publisher may not.
    assert (await fetch_status(relay.url, token=TOKENS["ops"], tls=tls))["streams"] == []
    for who in ("listener", "rec-1"):
        with pytest.raises(
            Refused, match=f"role not allowed: client '{who}' may not read the status"
        ):
            await fetch_status(relay.url, token=TOKENS[who], tls=tls)
    # A subscriber may not publish, a publisher may not subscribe.
    pub = publisher(relay, tls, "listener")
    pub.stream("mic-1", FMT)
    assert "role not allowed: client 'listener' may not publish" in str(await refused(pub))
    sub = subscriber(relay, tls, "rec-1")
    assert "role not allowed: client 'rec-1' may not subscribe" in str(await refused(sub))
    assert count(relay, "audiosockets_refusals_total", reason="role_not_allowed") == 4


async def test_streams_allow_and_refuse(relay: Relay, tls: ssl.SSLContext) -> None:
    pub = publisher(relay, tls, "rec-1")
    pub.stream("hall", FMT)
    error = await refused(pub)
    assert "stream not allowed: client 'rec-1' may not publish 'hall'" in str(error)
    assert "hall" not in relay.streams
    sub = subscriber(relay, tls, "listener", pattern="*")
    error = await refused(sub)
    assert "stream not allowed: client 'listener' may not subscribe to '*'" in str(error)
    ok = publisher(relay, tls, "rec-1")
    ok.stream("mic-7", FMT)
    await ok.start()
    assert await ok.wait_connected(5)
    await ok.close()
    assert count(relay, "audiosockets_refusals_total", reason="stream_not_allowed") == 2


async def test_groups_allow_and_refuse(relay: Relay, tls: ssl.SSLContext) -> None:
    member = subscriber(relay, tls, "archiver", group="archivers")
    await member.start()
    assert await member.wait_connected(5)
    error = await refused(subscriber(relay, tls, "archiver", group="analysts"))
    assert "group not allowed: client 'archiver' may not join group 'analysts'" in str(error)
    error = await refused(subscriber(relay, tls, "listener", group="archivers"))
    assert "group not allowed: client 'listener' may not join group 'archivers'" in str(error)
    assert count(relay, "audiosockets_refusals_total", reason="group_not_allowed") == 2
    await member.close()


# -- the attacks ----------------------------------------------------------------------------------


async def test_injection_into_a_live_stream_fails_and_subscribers_lose_nothing(
    relay: Relay, tls: ssl.SSLContext
) -> None:
    sub = subscriber(relay, tls, "listener", pattern="mic-1")
    await sub.start()
    assert await sub.wait_connected(5)
    real = publisher(relay, tls, "rec-1", name="recorder-mic-1")
    stream = real.stream("mic-1", FMT)
    await real.start()
    assert await real.wait_connected(5)
    for seq in range(25):
        stream.send(block(1000 + seq), captured_ns=time.time_ns())
    # rec-2 may publish any stream name, and calls itself after the real recorder.
    attacker = publisher(relay, tls, "rec-2", name="recorder-mic-1")
    fake = attacker.stream("mic-1", FMT)
    for _ in range(25):
        fake.send(block(-1), captured_ns=time.time_ns())
    error = await refused(attacker)
    assert "stream not allowed: 'mic-1' belongs to another publisher (rec-1)" in str(error)
    for seq in range(25, 50):
        stream.send(block(1000 + seq), captured_ns=time.time_ns())
    got = [await sub.get(5) for _ in range(50)]
    assert [c.seq for c in got] == list(range(50))
    assert [int(c.samples[0, 0]) for c in got] == [1000 + s for s in range(50)]
    assert sub.gaps == 0
    assert sub.duplicates == 0
    assert real.sessions == 1  # never taken over, never reconnected
    assert count(relay, "audiosockets_refusals_total", reason="stream_owned") == 1
    # The owner stays the owner after it disconnects: the stream is still refused to others.
    await real.close()
    again = publisher(relay, tls, "rec-2")
    again.stream("mic-1", FMT)
    assert "belongs to another publisher" in str(await refused(again))
    await sub.close()


async def test_group_join_attack_fails_and_the_member_keeps_its_streams(
    relay: Relay, tls: ssl.SSLContext
) -> None:
    member = subscriber(relay, tls, "archiver", group="archivers")
    await member.start()
    assert await member.wait_connected(5)
    pub = publisher(relay, tls, "rec-1")
    streams = [pub.stream(f"mic-{i}", FMT) for i in range(4)]
    await pub.start()
    assert await pub.wait_connected(5)
    # listener holds a valid token but is not given the group.
    await refused(subscriber(relay, tls, "listener", group="archivers"))
    for seq in range(10):
        for s in streams:
            s.send(block(seq), captured_ns=time.time_ns())
    got = [await member.get(5) for _ in range(40)]
    assert sorted({c.stream for c in got}) == [f"mic-{i}" for i in range(4)]
    assert len(relay.groups["archivers"].members) == 1
    await pub.close()
    await member.close()


# -- SIGHUP: reload --------------------------------------------------------------------------------


async def test_reload_keeps_allowed_sessions_and_closes_the_others(
    relay: Relay, tls: ssl.SSLContext, credentials_file: Path
) -> None:
    keep = subscriber(relay, tls, "listener", pattern="mic-1")
    await keep.start()
    assert await keep.wait_connected(5)
    revoked = publisher(relay, tls, "rec-2")
    revoked.stream("other", FMT)
    await revoked.start()
    assert await revoked.wait_connected(5)
    pub = publisher(relay, tls, "rec-1")
    stream = pub.stream("mic-1", FMT)
    await pub.start()
    assert await pub.wait_connected(5)
    for seq in range(10):
        stream.send(block(seq), captured_ns=time.time_ns())
    # A broken file changes nothing.
    write(credentials_file, "[[client]]\nname = 1\n")
    assert not relay.reload_credentials()
    write(credentials_file, "\n")  # an empty file (truncated mid-edit) locks no one out
    assert not relay.reload_credentials()
    # rec-2 may now publish only "rec2-*"; the others are unchanged.
    write(
        credentials_file, credentials_toml(**{"rec-2": 'roles = ["publish"]\nstreams = ["rec2-*"]'})
    )
    assert relay.reload_credentials()
    async with asyncio.timeout(10):
        await revoked.failed.wait()
    error = revoked.failure
    assert isinstance(error, Refused)
    assert (
        "credentials reloaded: stream not allowed: client 'rec-2' may not publish 'other'"
        in str(error)
    )
    for seq in range(10, 20):
        stream.send(block(seq), captured_ns=time.time_ns())
    got = [await keep.get(5) for _ in range(20)]
    assert [c.seq for c in got] == list(range(20))
    assert keep.sessions == 1  # never dropped
    assert pub.sessions == 1
    await revoked.close()
    await pub.close()
    await keep.close()


async def test_reload_revokes_a_removed_token(
    relay: Relay, tls: ssl.SSLContext, credentials_file: Path
) -> None:
    sub = subscriber(relay, tls, "listener")
    await sub.start()
    assert await sub.wait_connected(5)
    text = credentials_toml()
    start = text.index('[[client]]\nname = "listener"')
    end = text.index("[[client]]", start + 1)
    write(credentials_file, text[:start] + text[end:])
    assert relay.reload_credentials()
    async with asyncio.timeout(10):
        await sub.failed.wait()
    error = sub.failure
    assert isinstance(error, Refused)
    assert "credentials reloaded: this token is no longer valid" in str(error)
    with pytest.raises(Refused):
        await sub.get(5)
    await sub.close()


# -- the throttle, pure --------------------------------------------------------------------------


def test_throttle_doubles_caps_forgets_and_rate_limits_logs() -> None:
    now = [0.0]
    throttle = AuthThrottle(
        base=0.1, cap=1.0, forget_after=60, log_every=10, max_addresses=3, clock=lambda: now[0]
    )
    penalties = [throttle.refused("10.0.0.1", failed_auth=True) for _ in range(6)]
    assert [p.delay for p in penalties] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert [p.log for p in penalties] == [True, False, False, False, False, False]
    now[0] = 10.0
    penalty = throttle.refused("10.0.0.1", failed_auth=True)
    assert penalty.log
    assert penalty.suppressed == 5
    assert throttle.refused("10.0.0.2", failed_auth=True).delay == 0.1  # per address
    assert throttle.refused("10.0.0.3", failed_auth=False).delay == 0.0  # not an auth failure
    now[0] = 100.0
    assert throttle.refused("10.0.0.1", failed_auth=True).delay == 0.1  # forgotten after 60 s
    throttle.refused("10.0.0.4", failed_auth=True)
    assert len(throttle) == 3  # bounded
