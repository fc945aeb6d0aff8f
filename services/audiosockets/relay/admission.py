"""Who gets a session, and how refusals and cuts are counted and logged.

- ``LimitCounters``: the counters every limit of the relay reports to, each
  with a ``reason`` label, created at zero so a scrape shows them before the
  first refusal.
- ``RateLimitedLog``: one log line per reason per interval, the rest counted
  into the next line ("and N more"), so a flood of refusals cannot flood the
  log.
- ``Admission``: the session caps, relay-wide and per source address,
  checked when a connection is accepted (before anything is read from it, so
  a refused client costs a descriptor for the time it takes to say why).
- ``raise_nofile``: the soft descriptor limit raised to the hard one at start,
  and the session cap held below it.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter

#: Descriptors kept free of sessions: the listener, the metrics endpoint and
#: its scrapes, log files, and the accept() that tells a refused client why.
DESCRIPTOR_RESERVE: Final = 64

SESSION_REFUSALS: Final = ("relay_full", "address_full")
SESSION_CUTS: Final = ("idle", "write_buffer_full")
STREAM_REFUSALS: Final = ("relay_streams_full", "publisher_streams_full")
THROTTLES: Final = ("status_rate",)


class LimitCounters:
    """The relay's limit counters on ``registry``.

    ``sessions_refused{reason}``: connections refused at accept
    (``relay_full``, ``address_full``); ``sessions_cut{reason}``: open sessions
    the relay ended to protect itself (``idle``, ``write_buffer_full``);
    ``streams_refused{reason}``: OPEN_STREAMs answered CLOSE_STREAM
    ``refused`` (``relay_streams_full``, ``publisher_streams_full``);
    ``streams_forgotten``: streams forgotten after their grace period;
    ``requests_throttled{reason}``: requests answered late by a rate limit
    (``status_rate``); ``accept_errors``: failed ``accept()`` calls (out of
    descriptors, usually).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sessions_refused = Counter(
            "audiosockets_sessions_refused",
            "Connections the relay refused at accept because a session cap was reached.",
            ["reason"],
            registry=r,
        )
        self.sessions_cut = Counter(
            "audiosockets_sessions_cut",
            "Open sessions the relay ended to protect itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams_refused = Counter(
            "audiosockets_streams_refused",
            "OPEN_STREAMs refused because a stream cap was reached, by reason.",
            ["reason"],
            registry=r,
        )
        self.streams_forgotten = Counter(
            "audiosockets_streams_forgotten",
            "Streams forgotten (window, position, metric series) after their grace period.",
            registry=r,
        )
        self.requests_throttled = Counter(
            "audiosockets_requests_throttled",
            "Requests answered late because of a per-session rate limit, by reason.",
            ["reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "audiosockets_accept_errors",
            "accept() calls that failed on the listening socket (e.g. out of descriptors).",
            registry=r,
        )
        for counter, reasons in (
            (self.sessions_refused, SESSION_REFUSALS),
            (self.sessions_cut, SESSION_CUTS),
            (self.streams_refused, STREAM_REFUSALS),
            (self.requests_throttled, THROTTLES),
        ):
            for reason in reasons:
                counter.labels(reason)


class RateLimitedLog:
    """At most one warning per ``key`` per ``interval`` seconds of ``clock``;
    the lines held back are counted and reported with the next one."""

    def __init__(
        self, logger: logging.Logger, clock: Callable[[], float], interval: float = 10.0
    ) -> None:
        self._log = logger
        self._clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held = Tally[str]()

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than
        ``interval`` ago (then count it); returns whether it was logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            self._log.warning(
                message + " (and %d more like it since the last such line)", *args, held
            )
        else:
            self._log.warning(message, *args)
        return True


class Admission:
    """Session caps: ``max_sessions`` relay-wide and ``per_address`` per source
    address (IP, port ignored). ``admit`` takes a place or says why not;
    ``release`` gives it back."""

    def __init__(self, max_sessions: int, per_address: int) -> None:
        self.max_sessions = max_sessions
        self.per_address = per_address
        self.total = 0
        self.by_address = Tally[str]()

    def admit(self, address: str) -> str | None:
        """Take a place for a connection from ``address``; None when admitted,
        else the refusal reason (``relay_full`` or ``address_full``)."""
        if self.total >= self.max_sessions:
            return "relay_full"
        if self.by_address[address] >= self.per_address:
            return "address_full"
        self.total += 1
        self.by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        """Give back the place an admitted connection from ``address`` held."""
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


def raise_nofile() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft
    limit now in force (None where there is no such limit, e.g. Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < 1 << 16:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 16, hard))
            soft = 1 << 16
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else int(soft)


def session_cap(configured: int, nofile: int | None) -> int:
    """The session cap in force: ``configured``, held below the descriptor
    limit ``nofile`` by ``DESCRIPTOR_RESERVE`` (at least 1)."""
    if nofile is None:
        return configured
    return max(1, min(configured, nofile - DESCRIPTOR_RESERVE))


class StreamRefused(Exception):
    """An OPEN_STREAM would pass a stream cap; ``reason`` is the
    ``audiosockets_streams_refused_total`` label. The publisher gets
    CLOSE_STREAM ``refused`` for that stream; its session goes on."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
