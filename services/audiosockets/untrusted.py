"""Text that came from the network, made safe for a terminal or a log line.

Stream, client, group and server names arrive from peers. Printed raw, a
newline forges a log line and an ANSI/OSC escape clears a screen or retitles a
window. ``escape`` makes such text one printable line: every character Python
does not call printable (controls C0, DEL and C1, line and paragraph
separators, invisible format characters such as bidirectional overrides, odd
spaces such as U+00A0, unassigned code points) becomes a Python-style escape
(``\\n``, ``\\x1b``, ``\\u202e``), and a backslash becomes ``\\\\`` so the
mapping stays one-to-one. Printable text, including non-ASCII letters, is kept.

``EscapingFormatter`` applies it to every log message, whatever module logs
and however the name got into the arguments.
"""

from __future__ import annotations

import logging
from typing import Any

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    """``text`` with control and invisible format characters escaped (one printable line)."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    out = []
    for char in text:
        if char in _SHORT:
            out.append(_SHORT[char])
        elif not char.isprintable():
            code = ord(char)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
        else:
            out.append(char)
    return "".join(out)


def quote_blank(text: str) -> str:
    """An ``escape``d name as one visible table cell: quoted (``"..."``, inner ``"``
    as ``\\"``) when it is empty, has leading or trailing whitespace, or starts
    with a quote; otherwise unchanged. A stream named " " would print as a blank cell."""
    if text and text.strip() == text and not text.startswith('"'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


#: Characters of a peer's free text (a GOODBYE or ERROR message) a log line keeps.
CLIP_CHARS = 200


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out.

    For free text a peer chose (up to 64 KiB on the wire), so one frame cannot
    write that much into a log line."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def escape_all(value: Any) -> Any:
    """``value`` (a JSON-like tree: dicts, lists, strings, numbers) with every string
    and dict key ``escape``d; for a report that came from the network."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(str(k)): escape_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_all(v) for v in value]
    return value


class EscapingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose messages are ``escape``d (tracebacks stay multi-line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int) -> None:
    """Log to stderr at ``level``, one escaped line per record (the CLI, and each
    processor worker process, which starts with no logging set up)."""
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
