"""A client certificate as the identity: a real relay, real mutual TLS, the site's certificates.

The credentials entry ``rec-cert`` names only a certificate (its subject CN);
a client presenting that certificate needs no token, gets exactly that
entry's grants, and a token sent beside it must be the same entry's.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from security_support import CERT_ONLY, TOKENS, Site, credentials_toml, refused, write

from _support import wait_until
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.certs import Issued
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.errors import ConfigError, Refused
from audiosockets.metrics import Metrics
from audiosockets.relay import Relay, RelayConfig
from audiosockets.tls import client_context, server_context

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST_RETRY = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.toml"
    path.write_text(credentials_toml() + CERT_ONLY)
    return path


async def running(config: RelayConfig) -> Relay:
    relay = Relay(config, metrics=Metrics())
    await relay.start()
    return relay


@pytest.fixture
async def relay(site: Site, credentials_file: Path) -> AsyncIterator[Relay]:
    """A relay with TLS, mutual TLS and the credentials."""
    tls = server_context(cert=site.relay.cert, key=site.relay.key, client_ca=site.ca)
    r = await running(RelayConfig(host="127.0.0.1", port=0, tls=tls, credentials=credentials_file))
    try:
        yield r
    finally:
        await r.stop()


def cert_publisher(relay: Relay, site: Site, cert: Issued, token: str = "") -> Publisher:
    tls = client_context(ca=site.ca, cert=cert.cert, key=cert.key)
    return Publisher(
        relay.url, name="rec-cert", token=token, tls=tls, retry=FAST_RETRY, metrics=Metrics()
    )


def count(relay: Relay, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "audiosockets_refusals_total", {"reason": reason}
    )
    return 0.0 if value is None else value


async def test_a_certificate_only_identity_publishes_its_stream(
    relay: Relay, site: Site, rec_cert: Issued
) -> None:
    listener_tls = client_context(ca=site.ca, cert=site.client.cert, key=site.client.key)
    sub = Subscriber(
        relay.url, "mic-*", name="listener", token=TOKENS["listener"], tls=listener_tls,
        retry=FAST_RETRY, metrics=Metrics(), start="earliest",
    )  # fmt: skip
    await sub.start()
    assert await sub.wait_connected(5)
    pub = cert_publisher(relay, site, rec_cert)  # no token at all
    stream = pub.stream("mic-cert-1", FMT)
    await pub.start()
    for seq in range(10):
        stream.send(np.full((320, 1), seq, dtype=np.int16), captured_ns=time.time_ns())
    got = [await sub.get(5) for _ in range(10)]
    assert [c.seq for c in got] == list(range(10))
    assert relay.streams["mic-cert-1"].owner == "rec-cert"  # the certificate's entry owns it
    await pub.close()
    await sub.close()


async def test_a_certificate_only_identity_is_refused_a_stream_outside_its_globs(
    relay: Relay, site: Site, rec_cert: Issued
) -> None:
    pub = cert_publisher(relay, site, rec_cert)
    pub.stream("hall", FMT)
    error = await refused(pub)
    assert "stream not allowed: client 'rec-cert' may not publish 'hall'" in str(error)
    assert count(relay, "stream_not_allowed") == 1


async def test_a_certificate_no_entry_names_without_a_token_is_refused(
    relay: Relay, site: Site
) -> None:
    pub = cert_publisher(relay, site, site.client)  # CN rec-1: no entry names it
    pub.stream("mic-1", FMT)
    error = await refused(pub)
    assert (
        "unknown certificate: no client of this relay has certificate 'rec-1', "
        "and no token was given" in str(error)
    )
    assert count(relay, "certificate_unknown") == 1


async def test_a_token_of_another_entry_with_a_certificate_is_refused(
    relay: Relay, site: Site, rec_cert: Issued
) -> None:
    pub = cert_publisher(relay, site, rec_cert, token=TOKENS["rec-2"])  # rec-2 may publish "*"
    pub.stream("hall", FMT)
    error = await refused(pub)
    assert (
        "certificate and token disagree: the certificate is client 'rec-cert''s "
        "and the token is not" in str(error)
    )
    assert count(relay, "certificate_mismatch") == 1
    assert relay.metrics.registry.get_sample_value("audiosockets_auth_failures_total") == 1


async def test_a_relay_that_asks_for_no_certificate_refuses_certificate_only_entries(
    site: Site, credentials_file: Path, tmp_path: Path
) -> None:
    """TLS without --tls-client-ca never sees a client certificate: an entry only a
    certificate identifies could never log in, so the relay says so at start."""
    tls = server_context(cert=site.relay.cert, key=site.relay.key)
    with pytest.raises(ConfigError, match=r"'rec-cert' can only log in with a client certificate"):
        Relay(
            RelayConfig(host="127.0.0.1", port=0, tls=tls, credentials=credentials_file),
            metrics=Metrics(),
        )
    # Plain TCP as well; an entry with a token too is fine, and reached by its token.
    both = tmp_path / "both.toml"
    both.write_text(credentials_toml() + CERT_ONLY.replace(
        'certificate = "rec-cert"',
        f'certificate = "rec-cert"\ntoken_sha256 = "{hashlib.sha256(b"cert-token").hexdigest()}"',
    ))  # fmt: skip
    with pytest.raises(ConfigError, match="'rec-cert'"):
        Relay(RelayConfig(host="127.0.0.1", port=0, credentials=credentials_file))
    relay = await running(RelayConfig(host="127.0.0.1", port=0, tls=tls, credentials=both))
    try:
        pub = Publisher(
            relay.url, name="rec-cert", token="cert-token", tls=client_context(ca=site.ca),
            retry=FAST_RETRY, metrics=Metrics(),
        )  # fmt: skip
        stream = pub.stream("mic-cert-1", FMT)
        await pub.start()
        stream.send(np.zeros(320, np.int16))
        assert await pub.flush(5)
        assert relay.streams["mic-cert-1"].owner is not None
        await pub.close()
        # A reload that would strand an entry keeps the credentials in force.
        both.write_text(credentials_toml() + CERT_ONLY)
        assert relay.reload_credentials() is False
    finally:
        await relay.stop()


async def test_reload_keeps_a_certificate_session_and_revokes_a_removed_certificate(
    relay: Relay, site: Site, rec_cert: Issued, credentials_file: Path
) -> None:
    pub = cert_publisher(relay, site, rec_cert)
    pub.stream("mic-cert-1", FMT)
    await pub.start()
    assert await pub.wait_connected(5)
    # Still named, wider grants: the session stays.
    write(credentials_file, credentials_toml() + CERT_ONLY.replace("mic-cert-*", "mic-*"))
    assert relay.reload_credentials()
    (session,) = [s for s in relay.sessions if s.name == "rec-cert"]
    assert session.identity.streams == ("mic-*",)
    # The entry gone: the session is closed by the rule that now refuses it.
    write(credentials_file, credentials_toml())
    assert relay.reload_credentials()
    async with asyncio.timeout(10):
        await pub.failed.wait()
    assert pub.sessions == 1
    assert isinstance(pub.failure, Refused)
    assert "credentials reloaded: unknown certificate: no client of this relay has " in str(
        pub.failure
    )
    await wait_until(lambda: count(relay, "certificate_unknown") == 1)
    await pub.close()
