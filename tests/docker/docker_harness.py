"""Drive a compose project on the real engine and read what its services report.

Everything a test asserts comes from the services themselves: the relay's
``status --json`` report (run inside the relay container), each container's
Prometheus endpoint (scraped from the host over the compose network), and the
archive files the processors write to bind-mounted host directories.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def build_images(tag: str) -> None:
    """Base image (cached) and the three service images, as compose names them."""
    done = subprocess.run(
        [str(HERE / "build_images.sh")],
        env={**os.environ, "AUDIOSOCKETS_IMAGE_TAG": tag},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"building the images failed:\n{done.stdout}\n{done.stderr}")


Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """One scrape of a metrics endpoint: sample name + labels -> value."""

    samples: dict[tuple[str, Labels], float]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))

    def label_values(self, name: str, label: str) -> set[str]:
        return {
            dict(ls)[label]
            for (n, ls), _ in self.samples.items()
            if n == name and label in dict(ls)
        }


def parse_metrics(text: str) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(samples)


class Compose:
    """One docker-compose project: a unique name, fixed files, a fixed environment."""

    def __init__(
        self,
        project: str,
        files: Sequence[Path],
        env: dict[str, str],
        profiles: Sequence[str] = (),
    ) -> None:
        self.project = project
        self.files = list(files)
        self.profiles = list(profiles)
        self.env = {**os.environ, **env, "COMPOSE_PROJECT_NAME": project}
        binary = shutil.which("docker-compose")
        if binary is None:
            raise AssertionError("docker-compose is not installed")
        self.binary = binary

    def run(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        profiles = [arg for p in self.profiles for arg in ("--profile", p)]
        done = subprocess.run(
            [self.binary, "--project-directory", str(ROOT), *files, *profiles, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def up(self, services: Iterable[str], scale: dict[str, int] | None = None) -> None:
        scales = [f"--scale={s}={n}" for s, n in (scale or {}).items()]
        self.run("up", "-d", "--no-build", "--no-recreate", *scales, *services)

    def containers(self, service: str) -> list[str]:
        """Ids of the service's containers, running or not, in replica order."""
        ids = self.run("ps", "-q", service).split()
        return sorted(ids, key=lambda c: inspect(c)["Name"])

    def network(self) -> str:
        return f"{self.project}_default"

    def relay_status(self) -> dict[str, Any]:
        out = self.run("exec", "-T", "relay", "audiosockets", "status", "--json", timeout=30)
        report: dict[str, Any] = json.loads(out)
        return report

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail=200", check=False)

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)


def docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def inspect(container: str) -> dict[str, Any]:
    info: list[dict[str, Any]] = json.loads(docker("inspect", container))
    return info[0]


def health(container: str) -> str:
    state = inspect(container)["State"]
    if not state.get("Running"):
        return "exited"
    return str(state.get("Health", {}).get("Status", "none"))


def container_ip(container: str) -> str:
    networks = inspect(container)["NetworkSettings"]["Networks"]
    for net in networks.values():
        if net.get("IPAddress"):
            return str(net["IPAddress"])
    raise AssertionError(f"container {container} has no IP address")


def scrape(container: str, port: int) -> Scrape:
    url = f"http://{container_ip(container)}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse_metrics(response.read().decode())


# --- archive files ----------------------------------------------------------------

_PART = re.compile(
    r"\.(?P<stream>.+)_\d{8}T\d{6}\.\d{6}Z_(?P<first>\d{10})\.wav(\.[A-Za-z0-9_-]+)?\.part"
)


@dataclass(frozen=True)
class Segment:
    stream: str
    first_seq: int
    last_seq: int
    closed: bool  # False: an unfinished ``.part`` left by a killed processor
    gap_before: dict[str, int] | None = None
    gap_after: dict[str, int] | None = None


def archived_segments(directory: Path) -> list[Segment]:
    """Closed segments from their sidecars, plus what unfinished ``.part`` files hold.

    A ``.part`` file's seq range is read from its name (first seq) and its size:
    whole chunks of the stream's chunk size, taken from its closed segments.
    """
    closed: list[Segment] = []
    chunk_bytes: dict[str, int] = {}
    for sidecar in sorted(directory.glob("*.json")):
        meta = json.loads(sidecar.read_text())
        closed.append(
            Segment(
                meta["stream"],
                meta["first_seq"],
                meta["last_seq"],
                True,
                meta.get("gap_before"),
                meta.get("gap_after"),
            )
        )
        wav = sidecar.with_suffix(".wav")
        if meta["chunks"]:
            chunk_bytes[meta["stream"]] = (wav.stat().st_size - 44) // meta["chunks"]
    parts: list[Segment] = []
    for part in sorted(directory.glob(".*.wav*.part")):
        m = _PART.fullmatch(part.name)
        if m is None or m["stream"] not in chunk_bytes:
            continue
        chunks = (part.stat().st_size - 44) // chunk_bytes[m["stream"]]
        if chunks > 0:
            first = int(m["first"])
            parts.append(Segment(m["stream"], first, first + chunks - 1, False))
    return closed + parts


def missing_seqs(segments: Iterable[Segment], stream: str, last_seq: int) -> list[int]:
    """Seqs in ``0..last_seq`` that no segment of ``stream`` holds."""
    held = set[int]()
    for seg in segments:
        if seg.stream == stream:
            held.update(range(seg.first_seq, seg.last_seq + 1))
    return [seq for seq in range(last_seq + 1) if seq not in held]


def poll(predicate: Callable[[], bool], timeout: float, step: float = 0.25) -> bool:
    """True once ``predicate`` holds, False at the deadline. Errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except (AssertionError, OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
