"""Liveness and readiness of a service, served beside ``/metrics`` on the same port.

Why not just ``/metrics``: the metrics endpoint runs on its own thread and answers
even when the service's event loop is wedged (a blocking call, a busy loop, a
deadlock), so a probe that reads it says "healthy" about a service that moves no
audio. Here the loop must prove it is alive:

- **Liveness** (``/healthz``): a timer callback on the service's event loop writes
  the time of its last run (``Heartbeat``), every ``interval`` seconds. The HTTP
  thread compares that time with now: older than ``stall_seconds`` means the loop
  has made no progress for that long, and ``/healthz`` answers 503. A restart is
  the only cure for that, so this is what the Docker ``HEALTHCHECK`` and the
  Kubernetes liveness probe ask.
- **Readiness** (``/readyz``): whether the service does its job right now (the
  relay is listening; a recorder or processor holds a session with the relay), as
  the service's own ``ready`` function says. Not ready is not a reason to restart:
  a recorder keeps recording into its spool while the relay is away.

Invariants: the heartbeat is a self-rescheduling ``call_later`` timer, not a task,
so it cannot fail and has nothing to await on the way out (it dies with its loop).
The HTTP thread only reads one float and calls ``ready``, which must not block
and must not touch the loop. Both endpoints answer ``text/plain``: one line, the
reason, so ``curl`` and ``docker inspect`` show why.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from prometheus_client import CollectorRegistry

#: Seconds between heartbeats on the event loop.
HEARTBEAT_INTERVAL_SECONDS: Final = 1.0
#: A loop silent this long is wedged. Ten heartbeats: long enough that a busy
#: loop on a loaded 2-core box (scheduling delays of a few 100 ms) never trips
#: it, short enough that the probes below restart a wedged relay within a minute.
STALL_SECONDS: Final = 10.0

LIVENESS_PATH: Final = "/healthz"
READINESS_PATH: Final = "/readyz"

#: ``ready()`` returns None when ready, else the reason it is not (one sentence).
ReadyCheck = Callable[[], "str | None"]


class Heartbeat:
    """The time of the event loop's last heartbeat, readable from any thread.

    ``start(loop)`` schedules the first beat on ``loop`` (call it from the loop's
    thread, e.g. inside a coroutine); ``stop()`` cancels the next one. ``clock`` is
    ``time.monotonic`` unless a test drives its own.
    """

    def __init__(
        self,
        *,
        interval: float = HEARTBEAT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, not {interval}")
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._beat()

    def stop(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def _beat(self) -> None:
        assert self._loop is not None
        self._last = self._clock()
        self._next = self._loop.call_later(self.interval, self._beat)

    def age(self) -> float | None:
        """Seconds since the last beat; None before the first."""
        last = self._last
        return None if last is None else max(0.0, self._clock() - last)


@dataclass(frozen=True)
class Verdict:
    """One probe's answer: ``ok`` and the sentence that explains it."""

    ok: bool
    reason: str


class Health:
    """What ``/healthz`` and ``/readyz`` answer for one service."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        ready: ReadyCheck | None = None,
        *,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        if stall_seconds <= heartbeat.interval:
            raise ValueError(
                f"stall_seconds ({stall_seconds}) must exceed the heartbeat interval "
                f"({heartbeat.interval})"
            )
        self.heartbeat = heartbeat
        self.stall_seconds = stall_seconds
        self._ready = ready

    @classmethod
    def watch_running_loop(
        cls, ready: ReadyCheck | None = None, *, stall_seconds: float = STALL_SECONDS
    ) -> Health:
        """Start a heartbeat on the running event loop and watch it (call on the loop)."""
        heartbeat = Heartbeat()
        heartbeat.start()
        return cls(heartbeat, ready, stall_seconds=stall_seconds)

    def liveness(self) -> Verdict:
        age = self.heartbeat.age()
        if age is None:
            return Verdict(False, "event loop has not started its heartbeat")
        if age > self.stall_seconds:
            return Verdict(
                False,
                f"event loop stalled: no progress for {age:.1f} s (limit {self.stall_seconds:g} s)",
            )
        return Verdict(True, f"event loop alive: last heartbeat {age:.1f} s ago")

    def readiness(self) -> Verdict:
        alive = self.liveness()
        if not alive.ok:
            return alive
        problem = self._ready() if self._ready is not None else None
        return Verdict(True, "ready") if problem is None else Verdict(False, problem)


def session_ready(registry: CollectorRegistry, role: str) -> ReadyCheck:
    """Ready while ``audiosockets_connected{role=ROLE}`` is 1 (the client's live session)."""

    def ready() -> str | None:
        value = registry.get_sample_value("audiosockets_connected", {"role": role})
        if value == 1:
            return None
        return f"no live session with the relay ({role})"

    return ready


# --- the HTTP side ---------------------------------------------------------------


def _answer(start_response: StartResponse, verdict: Verdict) -> Iterable[bytes]:
    status = "200 OK" if verdict.ok else "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [verdict.reason.encode() + b"\n"]


def with_health(metrics_app: WSGIApplication, health: Health | None) -> WSGIApplication:
    """``metrics_app`` plus ``/healthz`` and ``/readyz`` (404 when ``health`` is None)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in (LIVENESS_PATH, READINESS_PATH):
            if health is None:
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"no health checks in this process\n"]
            verdict = health.liveness() if path == LIVENESS_PATH else health.readiness()
            return _answer(start_response, verdict)
        return metrics_app(environ, start_response)

    return app


def serve_http(
    port: int,
    registry: CollectorRegistry,
    health: Health | None,
    addr: str = "127.0.0.1",
    *,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Serve ``/metrics`` (and any other path, as Prometheus' own server does),
    ``/healthz`` and ``/readyz`` on ``addr:port`` (``metrics_http``: bounded
    threads, idle timeout, any address family, HTTPS with ``tls``).

    ``family`` is ``addr``'s address family (``AF_INET6`` for an IPv6 address;
    ``::`` then accepts IPv4 clients too where the OS allows dual-stack).
    Returns the bound port (``port=0`` picks one). Raises ``OSError`` when the
    address cannot be resolved or bound.
    """
    from prometheus_client import make_wsgi_app

    from .metrics import CallbackCollector
    from .metrics_http import serve_wsgi

    server = serve_wsgi(
        with_health(make_wsgi_app(registry), health),
        port,
        host=addr,
        tls=tls,
        register=lambda srv: registry.register(CallbackCollector(srv.refusals)),
    )
    return int(server.server_address[1])
