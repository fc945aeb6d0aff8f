"""The real command line against a real relay process with TLS, mTLS and credentials.

Each refusal ends `audiosockets record/process/status` with exit status 1 and
the rule's sentence, at once (no retrying forever); SIGHUP reloads the
credentials; names from the network reach terminals and logs escaped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from security_support import CERT_ONLY, TOKENS, Site, credentials_toml, write

from _support import free_port
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.certs import Issued
from audiosockets.client import Publisher
from audiosockets.client.handshake import connect
from audiosockets.errors import ErrorCode
from audiosockets.protocol import ErrorFrame, Goodbye, Hello, Role, encode
from audiosockets.tls import client_context
from audiosockets.urls import parse_url

CLI = [sys.executable, "-m", "audiosockets"]


@dataclass
class RelayProcess:
    url: str
    credentials: Path
    log: Path
    tokens: dict[str, Path]
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(predicate: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def relay(site: Site, tmp_path: Path) -> Iterator[RelayProcess]:
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(credentials_toml())
    tokens = {}
    for name, token in TOKENS.items():
        tokens[name] = tmp_path / f"{name}.token"
        tokens[name].write_text(token + "\n")
    log = tmp_path / "relay.log"
    url = f"tls://127.0.0.1:{free_port()}"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *CLI, "relay", "--listen", url, "--metrics-port", "0",
                "--tls-cert", str(site.relay.cert), "--tls-key", str(site.relay.key),
                "--tls-client-ca", str(site.ca), "--credentials", str(credentials),
            ],
            stderr=sink,
        )  # fmt: skip
    relay = RelayProcess(url, credentials, log, tokens, process)
    try:
        wait_for(lambda: "relay listening on" in relay.log_text(), "the relay to listen")
        yield relay
    finally:
        process.terminate()
        process.wait(10)


def cli(
    relay: RelayProcess, site: Site, *args: str, who: str | None, cert: bool = True
) -> subprocess.CompletedProcess[str]:
    tls = ["--tls-ca", str(site.ca)]
    if cert:
        tls += ["--tls-cert", str(site.client.cert), "--tls-key", str(site.client.key)]
    token = ["--token-file", str(relay.tokens[who])] if who else []
    return subprocess.run(
        [*CLI, *args, "--relay", relay.url, *tls, *token],
        capture_output=True,
        text=True,
        timeout=30,
    )


RECORD = ["record", "--source", "synth:sine", "--metrics-port", "0"]
PROCESS = ["process", "--handler", "level", "--metrics-port", "0"]


@pytest.mark.parametrize(
    ("args", "who", "reason"),
    [
        ([*RECORD, "--stream", "hall"], "rec-1", "stream not allowed: client 'rec-1' may not publish 'hall'"),
        ([*RECORD, "--stream", "mic-1"], "listener", "role not allowed: client 'listener' may not publish"),
        ([*RECORD, "--stream", "mic-1"], None, "unknown certificate: no client of this relay has certificate 'rec-1', and no token was given"),
        ([*PROCESS, "--stream", "*"], "listener", "stream not allowed: client 'listener' may not subscribe to '*'"),
        ([*PROCESS, "--stream", "mic-*", "--group", "analysts"], "archiver", "group not allowed: client 'archiver' may not join group 'analysts'"),
        ([*PROCESS, "--stream", "mic-*"], "rec-1", "role not allowed: client 'rec-1' may not subscribe"),
        (["status"], "listener", "role not allowed: client 'listener' may not read the status"),
    ],
)  # fmt: skip
def test_each_refusal_ends_the_real_client_with_status_1_and_the_rule(
    relay: RelayProcess, site: Site, args: list[str], who: str | None, reason: str
) -> None:
    started = time.monotonic()
    result = cli(relay, site, *args, who=who)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"audiosockets: error: relay {relay.url} refused")
    assert reason in last
    assert time.monotonic() - started < 20  # refused once, not retried


def test_status_without_a_client_certificate_exits_1(relay: RelayProcess, site: Site) -> None:
    result = cli(relay, site, "status", who="ops", cert=False)
    assert result.returncode == 1
    assert "a client certificate is required" in result.stderr
    result = cli(relay, site, "status", who="ops")
    assert result.returncode == 0, result.stderr
    assert "(no streams)" in result.stdout


def test_sighup_reloads_the_credentials(relay: RelayProcess, site: Site) -> None:
    assert cli(relay, site, "status", who="listener").returncode == 1
    write(
        relay.credentials,
        credentials_toml(listener='roles = ["subscribe", "admin"]\nstreams = ["mic-*"]'),
    )
    os.kill(relay.process.pid, signal.SIGHUP)
    wait_for(lambda: "credentials reloaded" in relay.log_text(), "the reload")
    result = cli(relay, site, "status", who="listener")
    assert result.returncode == 0, result.stderr
    assert relay.process.poll() is None  # SIGHUP did not stop the relay
    # A file that does not load keeps the credentials in force.
    write(relay.credentials, "[[client]]\nname = 'x'\n")
    os.kill(relay.process.pid, signal.SIGHUP)
    wait_for(lambda: "credentials not reloaded" in relay.log_text(), "the failed reload")
    assert cli(relay, site, "status", who="listener").returncode == 0


def test_loadtest_runs_over_mutual_tls_with_credentials(relay: RelayProcess, site: Site) -> None:
    result = cli(
        relay, site, "loadtest", "--streams", "2", "--subscribers", "1", "--duration", "1",
        "--json", who="loader",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chunks_received"] == report["chunks_expected"] > 0


def test_record_with_only_a_client_certificate_publishes_within_its_entry(
    relay: RelayProcess, site: Site, rec_cert: Issued
) -> None:
    """The certificate is the whole identity: no token, the entry's grants, exit 0 on SIGTERM."""
    write(relay.credentials, credentials_toml() + CERT_ONLY)
    os.kill(relay.process.pid, signal.SIGHUP)
    wait_for(lambda: "credentials reloaded" in relay.log_text(), "the reload")
    own_cert = [
        "--relay", relay.url, "--tls-ca", str(site.ca),
        "--tls-cert", str(rec_cert.cert), "--tls-key", str(rec_cert.key),
    ]  # fmt: skip
    record = subprocess.Popen(
        [*CLI, *RECORD, "--stream", "mic-cert-7", *own_cert],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def published() -> bool:
            status = cli(relay, site, "status", "--json", who="ops")
            assert status.returncode == 0, status.stderr
            streams = {s["name"]: s for s in json.loads(status.stdout)["streams"]}
            return streams.get("mic-cert-7", {}).get("last_seq", -1) >= 10

        wait_for(published, "mic-cert-7 to reach seq 10", timeout=30)
    finally:
        record.send_signal(signal.SIGTERM)
        _, stderr = record.communicate(timeout=30)
    assert record.returncode == 0, stderr.decode(errors="replace")
    # The same certificate, a stream outside its entry: refused at once, exit 1.
    result = subprocess.run(
        [*CLI, *RECORD, "--stream", "hall", *own_cert], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1, result.stderr
    assert "stream not allowed: client 'rec-cert' may not publish 'hall'" in result.stderr


HOSTILE = "mic-\x1b]0;pwned\x07\nFORGED LINE\x1b[2J"


def test_hostile_names_reach_status_and_logs_escaped(relay: RelayProcess, site: Site) -> None:
    tls = client_context(ca=site.ca, cert=site.client.cert, key=site.client.key)

    async def publish_then_ask() -> subprocess.CompletedProcess[str]:
        pub = Publisher(relay.url, name="rec\x1b[31m", token=TOKENS["rec-2"], tls=tls)
        pub.stream(HOSTILE, AudioFormat(16000, 1, SampleType.INT16))
        await pub.start()
        assert await pub.wait_connected(10)
        # A client's GOODBYE message is logged by the relay.
        channel = await connect(
            parse_url(relay.url), Hello(Role.OBSERVER, "x", TOKENS["ops"]), tls=tls
        )
        await channel.close(Goodbye(ErrorCode.NORMAL, "bye\nFORGED LINE\x1b[2J"))
        result = await asyncio.to_thread(cli, relay, site, "status", who="ops")
        await pub.close()
        return result

    result = asyncio.run(publish_then_ask())
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\\x1b]0;pwned\\x07\\nFORGED LINE\\x1b[2J" in result.stdout
    assert not any(line.startswith("FORGED") for line in result.stdout.splitlines())
    wait_for(lambda: "said goodbye" in relay.log_text(), "the goodbye logged")
    log = relay.log_text()
    assert "\x1b" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert "bye\\nFORGED LINE\\x1b[2J" in log


def test_a_hostile_relay_refusal_is_printed_escaped(tmp_path: Path) -> None:
    """A relay's ERROR message is network text too: the CLI's one line stays one line."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(
                encode(ErrorFrame(ErrorCode.UNAUTHORIZED, "no\nFORGED LINE\x1b]0;pwned\x07"))
            )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [*CLI, "status", "--relay", f"tcp://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        thread.join(10)
        server.close()
    assert result.returncode == 1
    assert "\x1b" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "no\\nFORGED LINE\\x1b]0;pwned\\x07" in result.stderr
