"""(f) Per-user subject permissions carry the relay's scopes: a recorder may
publish only its own stream. Publishing elsewhere is refused, and ``record``
exits with status 1 and one sentence; its own stream goes through."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from nats_harness import NatsServer

from audiosockets.connect import connect_subscriber
from audiosockets.jetstream.admin import init_stream
from audiosockets.jetstream.mapping import NatsSettings

# What a recorder for mic-1 needs: its subject, the stream's info and last
# message (resume), replies on its inbox. Nothing else.
PERMISSIONS = """
authorization {
  users: [
    {user: admin, password: adminpw}
    {user: rec1, password: rec1pw, permissions: {
      publish: {allow: [
        "audiosockets.mic-1",
        "$JS.API.STREAM.INFO.AUDIOSOCKETS",
        "$JS.API.STREAM.MSG.GET.AUDIOSOCKETS"
      ]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
  ]
}
"""


def record(url: str, stream: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "audiosockets", "record", "--relay", url,
            "--stream", stream, "--source", "synth:sine", "--metrics-port", "0", *extra,
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
async def test_recorder_outside_its_subjects_is_refused(
    servers: list[NatsServer], tmp_path: Path
) -> None:
    server = NatsServer("secured", tmp_path, extra=PERMISSIONS)
    servers.append(server)
    server.start()
    admin = f"nats://admin:adminpw@127.0.0.1:{server.port}"
    await init_stream(admin, NatsSettings())
    rec1 = f"nats://rec1:rec1pw@127.0.0.1:{server.port}"

    refused = await asyncio.to_thread(record, rec1, "mic-2")
    assert refused.returncode == 1, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert "mic-2" in last
    assert "may not publish to audiosockets.mic-2" in last
    assert "Traceback" not in refused.stderr
    assert "rec1pw" not in refused.stderr  # passwords stay out of the logs

    wrong = f"nats://rec1:nope@127.0.0.1:{server.port}"
    bad_login = await asyncio.to_thread(record, wrong, "mic-1")
    assert bad_login.returncode == 1, bad_login.stderr[-3000:]
    assert "refused our credentials (user rec1)" in bad_login.stderr.strip().splitlines()[-1]

    # A processor needs consumers, which this user may not create: refused too.
    processed = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-m", "audiosockets", "process", "--relay", rec1, "--stream", "mic-1",
            "--handler", "level", "--metrics-port", "0",
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert processed.returncode == 1, processed.stderr[-3000:]
    assert "may not use $js.api.consumer" in processed.stderr.strip().splitlines()[-1].lower()

    # The same user's own stream is accepted (the recorder runs until stopped).
    sub = connect_subscriber(admin, "mic-1", start="earliest")
    async with sub:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "audiosockets", "record", "--relay", rec1, "--stream", "mic-1",
            "--source", "synth:sine", "--metrics-port", "0",
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            chunk = await sub.get(30)
            assert chunk.stream == "mic-1"
        finally:
            proc.terminate()
            await proc.wait()
    assert proc.returncode == 0
