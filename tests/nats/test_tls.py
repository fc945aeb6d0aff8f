"""``nats+tls://`` NATS URLs: the client verifies the server against the CA given in
the URL (``?ca=``), and audio flows over the encrypted connection."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from nats_harness import NatsServer

from _support import require_binary
from audiosockets.audio import AudioFormat, SampleType
from audiosockets.connect import connect_publisher, connect_subscriber

FMT = AudioFormat(16000, 1, SampleType.INT16)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 it signed."""
    openssl = require_binary("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=audiosockets test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


async def test_audio_over_tls_verified_with_the_given_ca(
    servers: list[NatsServer], tmp_path: Path
) -> None:
    ca, cert, key = make_certificates(tmp_path)
    server = NatsServer(
        "tls", tmp_path, extra=f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n'
    )
    servers.append(server)
    server.start()
    url = f"nats+tls://127.0.0.1:{server.port}?ca={ca}"
    block = np.arange(320, dtype=np.int16)
    async with connect_publisher(url, name="rec") as pub:
        pub.stream("secure-1", FMT).send(block)
        assert await pub.flush(10)
    async with connect_subscriber(url, "secure-1", start="earliest") as sub:
        chunk = await sub.get(10)
    assert np.array_equal(chunk.samples[:, 0], block)
