"""README "From nothing to a TLS + mutual TLS + credentials site": the commands as written
work (with this machine's names for the relay), and the recorder of the example gets in."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADING = "### From nothing to a TLS + mutual TLS + credentials site"


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(HEADING) :]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match is not None, "no sh block under the heading"
    return match.group(1)


def wait_for(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_five_commands_make_a_working_site(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    block = readme_block().replace("relay.lan", "localhost").replace("192.0.2.10", "127.0.0.1")
    block = block.replace("0.0.0.0:7400", f"127.0.0.1:{port}")
    setup, relay_command = block.split("audiosockets relay", 1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", setup],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "relay.key").stat().st_mode & 0o777 == 0o600
    log = tmp_path / "relay.log"
    with log.open("wb") as sink:
        relay = subprocess.Popen(
            [
                "bash",
                "-c",
                "exec audiosockets relay --metrics-port 0 " + relay_command.replace("\\\n", " "),
            ],
            cwd=tmp_path,
            env=env,
            stderr=sink,
        )
    try:
        wait_for(lambda: "relay listening on tls://" in log.read_text(), "the relay")
        client = [
            "audiosockets", "record", "--relay", f"tls://localhost:{port}", "--source", "synth:sine",
            "--tls-ca", "site/ca.pem", "--tls-cert", "site/rec-1.pem", "--tls-key", "site/rec-1.key",
            "--token-file", "rec-1.token", "--metrics-port", "0",
        ]  # fmt: skip
        refused = subprocess.run(
            [*client, "--stream", "hall"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 1
        assert "stream not allowed: client 'rec-1' may not publish 'hall'" in refused.stderr
        recorder = subprocess.Popen(
            [*client, "--stream", "kitchen-1"], cwd=tmp_path, env=env, stderr=subprocess.PIPE
        )
        try:
            wait_for(
                lambda: "stream 'kitchen-1' opened by" in log.read_text(), "the recorder's stream"
            )
        finally:
            recorder.send_signal(signal.SIGTERM)
            recorder.wait(20)
        assert recorder.returncode == 0
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(20)
