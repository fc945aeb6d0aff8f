"""Names from the network are escaped before a terminal or a log line sees them."""

from __future__ import annotations

import io
import logging

from hypothesis import given
from hypothesis import strategies as st

from audiosockets.cli_support import format_status
from audiosockets.untrusted import EscapingFormatter, escape, escape_all

HOSTILE = "mic-1\n2026-01-01 ERROR forged line\x1b[2J\x1b]0;pwned\x07\u202eevil\r\t\\"


def test_escape_removes_every_control_and_format_character() -> None:
    out = escape(HOSTILE)
    assert out.isprintable()
    assert "\x1b" not in out
    assert "\n" not in out
    assert out == (
        "mic-1\\n2026-01-01 ERROR forged line\\x1b[2J\\x1b]0;pwned\\x07\\u202eevil\\r\\t\\\\"
    )


def test_printable_names_pass_unchanged() -> None:
    for name in ["mic-1", "küche/mikro 2", "マイク", "a b"]:
        assert escape(name) == name


@given(st.text())
def test_escape_is_printable_and_one_to_one(text: str) -> None:
    out = escape(text)
    assert out.isprintable()
    assert "\n" not in out
    assert "\r" not in out
    # One-to-one: a printable text containing a backslash is still told apart.
    assert escape(text + "\\n") != escape(text + "\n")


def test_log_lines_stay_one_line_per_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.untrusted")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("stream %s from %s lost", HOSTILE, "client\nERROR x")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("handler failed on %s", "a\nb")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("WARNING stream mic-1\\n2026")
    assert "\x1b" not in stream.getvalue()
    assert lines[1] == "ERROR handler failed on a\\nb"
    assert lines[2] == "Traceback (most recent call last):"  # tracebacks stay readable


def test_status_table_prints_hostile_names_escaped() -> None:
    report = {
        "server": "relay\x1b]0;x\x07",
        "version": "1",
        "uptime_s": 1,
        "replay_seconds": 30,
        "queue_seconds": 2,
        "streams": [
            {
                "name": HOSTILE,
                "format": {"rate": 16000, "channels": 1, "sample_type": "int16"},
                "publisher": "rec\x1b[31m",
                "rate_chunks_per_s": 50,
                "last_seq": 1,
                "window_seconds": 1,
                "subscribers": ["p\nq"],
            }
        ],
        "subscribers": [
            {
                "name": "sub\x1b[2J",
                "pattern": "*",
                "group": "g\x07",
                "lag_chunks": 0,
                "dropped": 0,
                "streams": [HOSTILE],
            }
        ],
        "groups": {"g\x07": {"members": ["m\n"], "assignment": {HOSTILE: "m\n"}}},
        "drops": {},
    }
    text = format_status(escape_all(report))
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "forged line" in text
    assert not any(line.startswith("2026-01-01 ERROR") for line in text.splitlines())


def test_status_table_quotes_names_that_would_print_as_blank_or_padded_cells() -> None:
    report = {
        "server": "r",
        "version": "1",
        "uptime_s": 1,
        "replay_seconds": 30,
        "queue_seconds": 2,
        "streams": [
            {
                "name": name,
                "format": {"rate": 16000, "channels": 1, "sample_type": "int16"},
                "publisher": "rec",
                "rate_chunks_per_s": 50,
                "last_seq": 1,
                "window_seconds": 1,
                "subscribers": [""],
            }
            for name in (" ", " mic ", '"quoted"', "mic-1")
        ],
        "subscribers": [],
        "groups": {},
        "drops": {},
    }
    rows = format_status(escape_all(report)).splitlines()[3:7]
    assert [row.split("  16000")[0].rstrip() for row in rows] == [
        '" "',
        '" mic "',
        '"\\"quoted\\""',
        "mic-1",
    ]
    assert all(row.endswith('  ""') for row in rows)  # an empty subscriber name, visible
