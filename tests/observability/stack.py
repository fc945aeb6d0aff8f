"""The real stack as loopback processes, and a real Prometheus scraping it.

``Stack`` starts ``audiosockets`` services as child processes (each its own
CLI, as a user runs them) on free loopback ports, and Debian's
``prometheus`` with a generated configuration: static targets for this
test (no Docker DNS here), 1 s scrapes and the repository's rule files.
Every process it started is stopped by ``close`` (SIGTERM, then SIGKILL
after a grace period), and only those.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from _support import free_port, wait_until_sync

from .support import PROMETHEUS_DIR

PROMETHEUS_SCRAPE_SECONDS = 1


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode("utf-8"))


def responds(url: str) -> bool:
    try:
        http_get(url, timeout=0.5)
    except (OSError, urllib.error.URLError):
        return False
    return True


def scrape(port: int) -> dict[str, float]:
    """One service's metrics as ``{'name{labels}': value}`` (exposition text as is)."""
    samples: dict[str, float] = {}
    # generous: on a loaded machine a service can take seconds to answer
    for line in http_get(f"http://127.0.0.1:{port}/metrics", timeout=20).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


@dataclass
class Service:
    name: str
    job: str
    argv: list[str]
    metrics_port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} runs"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            return responds(url)

        wait_until_sync(ready, timeout=timeout, what=f"{self.name} metrics")

    def freeze(self) -> None:
        """SIGSTOP: the process hangs (sockets stay open, nothing is read or
        answered), as a relay does in a long GC pause, a VM freeze or behind
        a network partition."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self, grace: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class Prometheus:
    """Debian's prometheus on a free loopback port, with its own data dir."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, list[str]]) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{self.port}"
        rules = sorted(str(p) for p in (PROMETHEUS_DIR / "rules").glob("*.yml"))
        config = {
            "global": {
                "scrape_interval": f"{PROMETHEUS_SCRAPE_SECONDS}s",
                "scrape_timeout": f"{PROMETHEUS_SCRAPE_SECONDS}s",
                "evaluation_interval": f"{PROMETHEUS_SCRAPE_SECONDS}s",
            },
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": instances}]}
                for job, instances in targets.items()
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = workdir / "prometheus.log"
        self.argv = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.started_at = time.time()

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            return responds(f"{self.url}/-/ready")

        wait_until_sync(ready, timeout=30, what="prometheus ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(http_get(url, timeout=30))
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read().decode("utf-8"))
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )
        return list(data["result"])

    def value(self, expr: str, at: float | None = None) -> float:
        """The single value of an expression that must return exactly one series."""
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def rules_evaluated_after(self, since: float) -> bool:
        """Every rule group has finished an evaluation whose evaluation time is
        after ``since`` (epoch seconds), so recorded series and alerts include
        every sample Prometheus held at ``since``.

        A group's ``lastEvaluation`` is the wall time its latest evaluation
        started, reported once that evaluation has finished; the evaluation
        time itself is the group's slot, up to one interval before the start
        when the group runs late. A start one interval after ``since`` puts
        the slot after it.
        """
        groups = self.api("rules")["groups"]
        return bool(groups) and all(
            datetime.fromisoformat(group["lastEvaluation"]).timestamp()
            >= since + float(group["interval"])
            for group in groups
        )

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


def finite(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


class Stack:
    """relay + recorders + processors as processes, each serving metrics."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.relay_port = free_port()
        self.relay_url = f"tcp://127.0.0.1:{self.relay_port}"
        self.services: dict[str, Service] = {}

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "audiosockets", "--log-level", "warning", *args]

    def add(self, name: str, job: str, *args: str, env: dict[str, str] | None = None) -> Service:
        port = free_port()
        service = Service(
            name=name,
            job=job,
            argv=self._cli(*args, "--metrics-port", str(port)),
            metrics_port=port,
            log=self.workdir / f"{name}.log",
            env=env or {},
        )
        self.services[name] = service
        return service

    def add_relay(self, *args: str) -> Service:
        return self.add(
            "relay",
            "relay",
            "relay",
            "--listen",
            self.relay_url,
            "--heartbeat-seconds",
            "1",
            *args,
        )

    def add_recorder(self, stream: str, source: str, *args: str) -> Service:
        return self.add(
            f"recorder-{stream}",
            "recorder",
            "record",
            "--relay",
            self.relay_url,
            "--stream",
            stream,
            "--source",
            source,
            "--block-ms",
            "20",
            *args,
        )

    def add_processor(self, name: str, *args: str, env: dict[str, str] | None = None) -> Service:
        return self.add(name, "processor", "process", "--relay", self.relay_url, *args, env=env)

    def targets(self) -> dict[str, list[str]]:
        jobs: dict[str, list[str]] = {}
        for service in self.services.values():
            jobs.setdefault(service.job, []).append(service.instance)
        return jobs

    def start(self) -> None:
        for service in self.services.values():
            service.start()
        for service in self.services.values():
            service.wait_ready()

    def close(self) -> None:
        # Clients first, so the relay sees goodbyes rather than resets.
        for service in sorted(self.services.values(), key=lambda s: s.job == "relay"):
            service.stop()
