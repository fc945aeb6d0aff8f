"""The JetStream mapping without a server: subject tokens are an injective
escape of stream names, messages parse or raise RemoteProtocolError (never
anything else), URLs and settings refuse what they cannot use."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ConfigError, RemoteProtocolError
from audiosockets.jetstream.mapping import (
    ChunkMessage,
    EndMessage,
    NatsSettings,
    chunk_headers,
    decode_message,
    end_headers,
    pattern_subject,
    stream_name_of,
    subject_token,
)
from audiosockets.urls import check_url, is_nats_url, parse_nats_url, redact

FMT = AudioFormat(48000, 2, SampleType.FLOAT32)
TOKEN_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


@given(st.text(min_size=1, max_size=60))
def test_subject_token_round_trips_and_is_one_token(name: str) -> None:
    token = subject_token(name)
    assert set(token) <= TOKEN_CHARS  # no '.', '*', '>' or whitespace: one subject token
    assert stream_name_of(token) == name


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_subject_token_is_injective(a: str, b: str) -> None:
    if a != b:
        assert subject_token(a) != subject_token(b)


def test_examples() -> None:
    assert subject_token("mic-1") == "mic-1"
    assert subject_token("hall.2") == "hall=2E2"
    assert subject_token("a=b") == "a=3Db"
    assert subject_token("küche") == "k=C3=BCche"


@given(st.text(max_size=30), st.dictionaries(st.text(max_size=30), st.text(max_size=30)))
def test_foreign_messages_raise_remote_protocol_error_only(
    subject: str, headers: dict[str, str]
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(subject, headers, b"\x00" * 8, "audiosockets")


def test_chunk_and_end_round_trip() -> None:
    headers = chunk_headers("pubid", 3, 41, 1_700_000_000_123, FMT)
    assert headers["Nats-Msg-Id"] == "pubid.3.41"
    msg = decode_message("audiosockets.hall=2E2", headers, b"\x00" * 16, "audiosockets")
    assert msg == ChunkMessage("hall.2", 41, 1_700_000_000_123, FMT, b"\x00" * 16)
    end = decode_message("audiosockets.x", end_headers("pubid", 3, 41), b"", "audiosockets")
    assert end == EndMessage("x", 41)
    with pytest.raises(RemoteProtocolError, match="whole number of frames"):
        decode_message("audiosockets.x", headers, b"\x00" * 15, "audiosockets")
    with pytest.raises(RemoteProtocolError, match="not under"):
        decode_message("other.x", headers, b"", "audiosockets")
    with pytest.raises(RemoteProtocolError, match="canonical"):
        decode_message("audiosockets.=41", headers, b"", "audiosockets")


def test_pattern_subject_narrows_exact_names_only() -> None:
    assert pattern_subject("mic-1", "as") == "as.mic-1"
    assert pattern_subject("mic-*", "as") == "as.>"
    assert pattern_subject("mic-[12]", "as") == "as.>"


def test_nats_urls() -> None:
    addr = parse_nats_url("nats://u:p@a:1,nats://u:p@b?replicas=3&stream=S")
    assert addr.servers == ("nats://a:1", "nats://b:4222")
    assert (addr.user, addr.password) == ("u", "p")
    assert NatsSettings.from_options(dict(addr.options)) == NatsSettings(stream="S", replicas=3)
    assert str(addr) == "nats://a:1,nats://b:4222"  # no credentials
    assert parse_nats_url("nats+tls://[::1]:4443").tls
    assert is_nats_url("nats+tls://h:1")
    assert not is_nats_url("tls://h:1")  # the relay over TLS
    assert not is_nats_url("tcp://h:1")
    check_url("tcp://h:1")
    check_url("nats://h")
    assert redact("nats://u:secret@a:1,nats://u:secret@b:2") == "nats://u:***@a:1,nats://u:***@b:2"


@pytest.mark.parametrize(
    "url",
    [
        "nats://",
        "nats://h:99999",
        "nats://h:1/x",
        "nats://h:1,",
        "nats://u:p@a:1,nats://v:p@b:1",
        "nats://h?replicas=2",
        "nats://h?replicas=x",
        "nats://h?stream=a.b",
        "nats://h?max_age=0",
        "nats://h?lag_interval=-1",
        "nats://h?lag_interval=x",
        "nats://h?bogus=1",
        "nats://h?stream=A&stream=B",
        "ws://h:1",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        NatsSettings.from_options(dict(parse_nats_url(url).options))


def test_stream_config_for_edge_and_central() -> None:
    edge = NatsSettings(replicas=3, max_age=60).stream_config()
    assert edge["subjects"] == ["audiosockets.>"]
    assert edge["num_replicas"] == 3
    assert edge["duplicate_window"] == 60  # never longer than what is kept
    central = NatsSettings().stream_config(sources=("edge1", "edge2"))
    assert "subjects" not in central
    assert [s["external"]["api"] for s in central["sources"]] == [
        "$JS.edge1.API",
        "$JS.edge2.API",
    ]


def test_prev_header_and_the_hole_rule() -> None:
    from audiosockets.jetstream.subscriber import skipped

    headers = chunk_headers("p", 1, 5, 0, FMT, prev=41)
    assert decode_message("audiosockets.x", headers, b"", "audiosockets").prev == 41  # type: ignore[union-attr]
    sourced = {**headers, "Nats-Stream-Source": "AUDIOSOCKETS 41 edge1"}
    assert decode_message("audiosockets.x", sourced, b"", "audiosockets").prev is None  # type: ignore[union-attr]
    assert not skipped(None, 10, 1)  # a stream's first message
    assert not skipped(41, 41, 1)  # follows the last one taken
    assert skipped(41, 30, 1)  # the consumer passed over stream seq 31..41
    assert skipped(41, None, 1)  # read from the start, yet an earlier message exists
    assert not skipped(41, None, 42)  # asked to start after it (live, or resumed)
