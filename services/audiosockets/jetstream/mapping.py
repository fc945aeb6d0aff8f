"""The JetStream mapping, without I/O: names, subjects, headers, settings.

An audiosockets stream is one NATS subject ``<prefix>.<token>`` in one JetStream
stream (PROTOCOL.md, "Second binding: NATS JetStream"). Everything here is a pure
function over plain data, so the mapping is tested without a server:

- ``subject_token``/``stream_name_of`` escape stream names injectively into one
  subject token (``[A-Za-z0-9_-]`` kept, every other UTF-8 byte as ``=XX``);
  the same tokens are valid key-value keys.
- ``chunk_headers``/``decode_message`` put seq, capture time and format in
  headers and read them back: a message parses, or raises
  ``RemoteProtocolError``, never anything else.
- ``NatsSettings`` is the JetStream side of the configuration (stream name,
  subject prefix, replicas, retention), from a URL's query or from flags.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..audio import AudioFormat, SampleType
from ..errors import ConfigError, ErrorCode, RemoteProtocolError

_KEPT: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPE: Final = re.compile(r"=([0-9A-F]{2})")
_TOKEN: Final = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")
_STREAM_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

#: Header names (case matters on the wire; NATS keeps it).
SEQ: Final = "Audiosockets-Seq"
CAPTURED: Final = "Audiosockets-Captured-Ns"
FORMAT: Final = "Audiosockets-Format"
EVENT: Final = "Audiosockets-Event"
#: The stream sequence of the subject's previous message (absent on its first):
#: lets a reader tell a hole in what a consumer delivered from a real gap.
PREV: Final = "Audiosockets-Prev"
MSG_ID: Final = "Nats-Msg-Id"
END: Final = "end"


def subject_token(name: str) -> str:
    """``name`` as one subject token: ``mic-1`` stays, ``hall.2`` becomes ``hall=2E2``."""
    if not name:
        raise ValueError("stream name must not be empty")
    out: list[str] = []
    for ch in name:
        if ch in _KEPT:
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def stream_name_of(token: str) -> str:
    """Inverse of ``subject_token``; raises ``RemoteProtocolError`` for a foreign token."""
    if not _TOKEN.fullmatch(token):
        raise RemoteProtocolError(f"subject token {token!r} is not an escaped stream name")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(token[i]))
            i += 1
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"subject token {token!r} is not UTF-8") from None
    if subject_token(name) != token:  # e.g. "=41" for a kept "A": not our encoding
        raise RemoteProtocolError(f"subject token {token!r} is not in canonical form")
    return name


def format_label(fmt: AudioFormat) -> str:
    """``16000/1/int16``: rate, channels, sample type."""
    return f"{fmt.rate}/{fmt.channels}/{fmt.sample_type.label}"


@functools.lru_cache(maxsize=256)
def parse_format(text: str) -> AudioFormat:
    try:
        rate, channels, sample_type = text.split("/")
        return AudioFormat(int(rate), int(channels), SampleType.parse(sample_type))
    except ValueError as exc:
        raise RemoteProtocolError(
            f"bad format header {text!r}: {exc}", ErrorCode.BAD_FORMAT
        ) from None


def message_id(publisher: str, stream_index: int, seq: int) -> str:
    """``Nats-Msg-Id``: unique per (publisher identity, stream, seq), so a re-send
    after a reconnect is recognised by the server's duplicate window."""
    return f"{publisher}.{stream_index}.{seq}"


def chunk_headers(
    publisher: str,
    stream_index: int,
    seq: int,
    captured_ns: int,
    fmt: AudioFormat,
    prev: int | None = None,
) -> dict[str, str]:
    headers = {
        MSG_ID: message_id(publisher, stream_index, seq),
        SEQ: str(seq),
        CAPTURED: str(captured_ns),
        FORMAT: format_label(fmt),
    }
    if prev is not None:
        headers[PREV] = str(prev)
    return headers


def end_headers(
    publisher: str, stream_index: int, last_seq: int, prev: int | None = None
) -> dict[str, str]:
    """The end-of-stream marker: no payload, ``Audiosockets-Seq`` is the last chunk's."""
    headers = {MSG_ID: f"{publisher}.{stream_index}.end.{last_seq}", SEQ: str(last_seq), EVENT: END}
    if prev is not None:
        headers[PREV] = str(prev)
    return headers


@dataclass(frozen=True, slots=True)
class ChunkMessage:
    stream: str
    seq: int
    captured_ns: int
    format: AudioFormat
    payload: bytes
    prev: int | None = None


@dataclass(frozen=True, slots=True)
class EndMessage:
    stream: str
    last_seq: int
    prev: int | None = None


def stream_of_subject(subject: str, prefix: str) -> str:
    head, dot, token = subject.rpartition(".")
    if not dot or head != prefix:
        raise RemoteProtocolError(f"subject {subject!r} is not under {prefix!r}")
    return stream_name_of(token)


def _int_header(headers: Mapping[str, str], name: str, lo: int, hi: int) -> int:
    text = headers.get(name)
    if text is None:
        raise RemoteProtocolError(f"message has no {name} header")
    try:
        value = int(text)
    except ValueError:
        raise RemoteProtocolError(f"{name} header {text!r} is not an integer") from None
    if not lo <= value <= hi:
        raise RemoteProtocolError(f"{name} header {value} is out of range")
    return value


def decode_message(
    subject: str, headers: Mapping[str, str] | None, payload: bytes, prefix: str
) -> ChunkMessage | EndMessage:
    """One stored message as a chunk or an end marker; anything else is
    ``RemoteProtocolError`` (someone published on our subjects by hand)."""
    stream = stream_of_subject(subject, prefix)
    headers = headers or {}
    seq = _int_header(headers, SEQ, -1, 2**64 - 1)
    event = headers.get(EVENT)
    if event == END:
        return EndMessage(stream, seq, _prev(headers))
    if event is not None:
        raise RemoteProtocolError(f"unknown {EVENT} {event!r}")
    if seq < 0:
        raise RemoteProtocolError(f"{SEQ} header {seq} is out of range")
    captured = _int_header(headers, CAPTURED, -(2**63), 2**63 - 1)
    fmt_text = headers.get(FORMAT)
    if fmt_text is None:
        raise RemoteProtocolError(f"message has no {FORMAT} header")
    fmt = parse_format(fmt_text)
    if len(payload) % fmt.frame_bytes:
        raise RemoteProtocolError("payload is not a whole number of frames", ErrorCode.BAD_FORMAT)
    return ChunkMessage(stream, seq, captured, fmt, payload, _prev(headers))


def _prev(headers: Mapping[str, str]) -> int | None:
    # A message sourced from another stream (an edge site's) carries that
    # stream's sequence numbers, not ours: no continuity check there.
    if PREV not in headers or "Nats-Stream-Source" in headers:
        return None
    return _int_header(headers, PREV, 1, 2**64 - 1)


def pattern_subject(pattern: str, prefix: str) -> str:
    """The narrowest subject filter for a glob ``pattern`` over stream names:
    the stream's own subject when the pattern has no glob character, else all."""
    if any(c in pattern for c in "*?["):
        return f"{prefix}.>"
    return f"{prefix}.{subject_token(pattern)}"


# --- settings --------------------------------------------------------------------

Storage = Literal["file", "memory"]


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """The JetStream side of the binding (query options of a ``nats://`` URL).

    ``stream``: JetStream stream name. ``prefix``: subject prefix (one stream per
    subject below it). ``replicas``: 1 or 3 copies (a 3-node cluster survives one
    node). ``max_age``: seconds kept: the replay window. ``duplicate_window``:
    seconds the server remembers ``Nats-Msg-Id`` values. ``domain``: the
    JetStream domain to use (a leaf node's or the hub's). ``create``: create the
    stream with these settings when it is missing. ``ca``: a PEM file of CA
    certificates to verify ``nats+tls://`` servers with (default: the system's).
    ``lag_interval``: seconds between a subscriber's consumer-info requests (one
    per consumer) for ``audiosockets_jetstream_consumer_pending_chunks``; 0: none.
    """

    stream: str = "AUDIOSOCKETS"
    prefix: str = "audiosockets"
    replicas: int = 1
    max_age: float = 600.0
    duplicate_window: float = 120.0
    storage: Storage = "file"
    domain: str | None = None
    create: bool = True
    ca: str | None = None
    lag_interval: float = 5.0

    def __post_init__(self) -> None:
        if not _STREAM_NAME.fullmatch(self.stream):
            raise ConfigError(f"NATS stream name {self.stream!r} must be 1-64 of A-Z a-z 0-9 _ -")
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(f"NATS subject prefix {self.prefix!r} must be dot-separated tokens")
        if self.replicas not in (1, 3, 5):
            raise ConfigError(f"NATS replicas must be 1, 3 or 5, not {self.replicas}")
        if not (self.max_age > 0 and math.isfinite(self.max_age)):
            raise ConfigError(
                f"NATS max_age must be a positive number of seconds, not {self.max_age}"
            )
        if not self.duplicate_window > 0:
            raise ConfigError("NATS duplicate_window must be positive")
        if not (self.lag_interval >= 0 and math.isfinite(self.lag_interval)):
            raise ConfigError(
                f"NATS lag_interval must be 0 (off) or seconds, not {self.lag_interval}"
            )
        if self.storage not in ("file", "memory"):
            raise ConfigError(f"NATS storage must be file or memory, not {self.storage!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> NatsSettings:
        """From a URL query: ``stream``, ``prefix``, ``replicas``, ``max_age``,
        ``duplicate_window``, ``storage``, ``domain``, ``create`` (0/1), ``ca``,
        ``lag_interval``."""
        known = {
            "stream",
            "prefix",
            "replicas",
            "max_age",
            "duplicate_window",
            "storage",
            "domain",
            "create",
            "ca",
            "lag_interval",
        }
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown NATS URL option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = {}
        try:
            for key, value in options.items():
                if key in ("replicas",):
                    kwargs[key] = int(value)
                elif key in ("max_age", "duplicate_window", "lag_interval"):
                    kwargs[key] = float(value)
                elif key == "create":
                    if value not in ("0", "1", "true", "false"):
                        raise ValueError(f"create={value!r} must be 0 or 1")
                    kwargs[key] = value in ("1", "true")
                else:
                    kwargs[key] = value or None if key in ("domain", "ca") else value
        except ValueError as exc:
            raise ConfigError(f"NATS URL option: {exc}") from None
        return cls(**kwargs)

    @property
    def members_bucket(self) -> str:
        """Key-value bucket of group members (entries expire: heartbeats)."""
        return f"{self.stream}_members"

    @property
    def groups_bucket(self) -> str:
        """Key-value bucket of group assignments and acknowledged points."""
        return f"{self.stream}_groups"

    def subject(self, stream: str) -> str:
        return f"{self.prefix}.{subject_token(stream)}"

    def stream_config(self, *, sources: tuple[str, ...] = ()) -> dict[str, Any]:
        """Keyword arguments for ``add_stream``. With ``sources`` (JetStream
        domains of edge sites), the stream takes no subjects of its own and
        sources the stream of the same name from each domain."""
        config: dict[str, Any] = {
            "name": self.stream,
            "max_age": self.max_age,
            "duplicate_window": min(self.duplicate_window, self.max_age),
            "num_replicas": self.replicas,
            "storage": self.storage,
            "allow_direct": True,
            "description": "audiosockets: one subject per audio stream",
        }
        if sources:
            config["sources"] = [
                {"name": self.stream, "external": {"api": f"$JS.{domain}.API"}}
                for domain in sources
            ]
        else:
            config["subjects"] = [f"{self.prefix}.>"]
        return config
