"""One publisher per stream, and refusals that end a client (issue 13, items 1, 2 and 9).

Before: a second ``record`` on a published stream took it over and was taken over back
(13 takeovers in 10 s, two microphones interleaved, capture times going backwards); a
wrong token, a name over the wire limit and a chunk over the relay's frame limit were
retried forever (the last one then claimed "all taken by the relay", exit 0); a refused
session logged an internal error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from _support import wait_until
from audiosockets.audio import AudioFormat, Chunk, SampleType
from audiosockets.client import Publisher, RetryPolicy, Subscriber
from audiosockets.client.handshake import connect
from audiosockets.errors import ErrorCode, RelayRefused
from audiosockets.metrics import Metrics
from audiosockets.protocol import (
    ChunkData,
    Connection,
    ErrorFrame,
    Hello,
    Limits,
    NeedData,
    OpenStream,
    Ping,
    Pong,
    Role,
    StreamAccepted,
    Welcome,
)
from audiosockets.relay import Relay, RelayConfig
from audiosockets.urls import parse_url

FMT = AudioFormat(16000, 1, SampleType.INT16)
FAST = RetryPolicy(initial=0.02, cap=0.2, jitter=0.02, connect_timeout=1.0)
#: A refusal must end the client within this (it used to retry forever).
BOUND = 10.0


def block(value: int) -> np.ndarray:
    return np.full(320, value, np.int16)


def spawn(command: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "audiosockets", command, "--metrics-port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def spawn_record(*args: str) -> subprocess.Popen[bytes]:
    return spawn("record", "--loop", "asyncio", *args)


async def finish(process: subprocess.Popen[bytes], timeout: float = BOUND) -> tuple[int, str]:
    """Exit status and stderr of a process expected to end by itself within ``timeout``."""
    try:
        _, err = await asyncio.to_thread(process.communicate, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = await asyncio.to_thread(process.communicate)
        pytest.fail(f"still running after {timeout:g} s:\n{err.decode()[-2000:]}")
    return process.returncode, err.decode()


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("audiosockets: error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


# --- item 1: one publisher per stream ---------------------------------------------------


async def test_a_second_recorder_on_a_published_stream_is_refused_and_exits_1(
    relay: Relay,
) -> None:
    received: list[Chunk] = []
    async with Subscriber(relay.url, "dup-1", name="watch", start="earliest", retry=FAST) as sub:

        async def drain() -> None:
            async for chunk in sub:
                received.append(chunk)

        reader = asyncio.create_task(drain())
        first = spawn_record("--relay", relay.url, "--stream", "dup-1", "--source", "synth:sine")
        try:
            await wait_until(lambda: len(received) >= 10, timeout=20, what="the first recorder")
            began = time.monotonic()
            second = spawn_record(
                "--relay", relay.url, "--stream", "dup-1", "--source", "synth:silence"
            )
            code, err = await finish(second)
            assert code == 1
            assert time.monotonic() - began < BOUND
            line = error_line(err)
            assert "stream dup-1 is already published by recorder-dup-1 from 127.0.0.1:" in line
            # The first recorder never noticed: still publishing, one contiguous stream.
            seen = len(received)
            await wait_until(lambda: len(received) >= seen + 10, what="more of the first")
            assert first.poll() is None
        finally:
            first.terminate()
            code, err = await finish(first)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    assert code == 0, err
    seqs = [c.seq for c in received]
    assert seqs == list(range(len(seqs)))
    stamps = [c.captured_ns for c in received]
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert all(np.any(c.samples != 0) for c in received)  # never the silence recorder
    assert value(relay.metrics, "audiosockets_sequence_gaps_total", stream="dup-1") == 0


async def test_the_same_publisher_run_takes_its_stream_back_at_once(relay: Relay) -> None:
    """Its reconnect after a network blip finds the relay still holding its old,
    half-open session: the same instance gets the stream at once."""
    instance = 0x1234_5678_9ABC_DEF0
    address = parse_url(relay.url)
    stale = await connect(address, Hello(Role.PUBLISHER, "rec-a", "", instance))
    stale.send(OpenStream(1, "blip-1", FMT))
    assert isinstance(await stale.next_event(), StreamAccepted)
    pub = Publisher(relay.url, name="rec-a", retry=FAST, instance=instance)
    pub.stream("blip-1", FMT).send(block(1))
    began = time.monotonic()
    await pub.start()
    assert await pub.wait_connected(5)
    assert time.monotonic() - began < 2.0  # not after the 3-interval heartbeat timeout
    assert await pub.flush(5)
    assert pub.failure is None
    stale.abort()
    await pub.close(1.0)


async def test_another_publisher_run_is_refused_while_the_holder_is_connected(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    address = parse_url(relay.url)
    holder = await connect(address, Hello(Role.PUBLISHER, "rec-a", "", 1))
    holder.send(OpenStream(1, "held-1", FMT))
    assert isinstance(await holder.next_event(), StreamAccepted)
    caplog.set_level(logging.DEBUG, logger="audiosockets")
    pub = Publisher(relay.url, name="rec-b", retry=FAST, instance=2)
    pub.stream("held-1", FMT).send(block(1))
    await pub.start()
    await asyncio.wait_for(pub.failed.wait(), BOUND)
    assert isinstance(pub.failure, RelayRefused)
    assert pub.failure.code is ErrorCode.STREAM_IN_USE
    assert pub.failure.exit_code == 1
    assert "stream held-1 is already published by rec-a from 127.0.0.1:" in str(pub.failure)
    assert pub.attempts == 1  # no retries
    assert await pub.flush(1) is False
    await pub.close(0.5)
    # Item 9: the expected refusal logs no internal error and no traceback.
    client_records = [r for r in caplog.records if r.name == "audiosockets.client"]
    assert not [r for r in client_records if r.levelno >= logging.ERROR], caplog.text
    assert not [r for r in client_records if r.exc_info], caplog.text
    assert "session failed" not in caplog.text
    assert "cannot send CHUNK" not in caplog.text
    # Once the holder is gone the stream is free for anyone.
    holder.abort()
    await wait_until(lambda: relay.streams["held-1"].publisher is None, what="holder gone")
    pub2 = Publisher(relay.url, name="rec-b", retry=FAST)
    pub2.stream("held-1", FMT).send(block(2))
    await pub2.start()
    assert await pub2.wait_connected(5)
    assert await pub2.flush(5)
    await pub2.close(1.0)


async def test_claims_on_a_held_stream_are_counted_and_logged_at_a_rate_limit(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused claim was a WARNING line and counted nowhere: a hijacker
    retrying in a loop flooded the log and left no trace in the metrics."""
    address = parse_url(relay.url)
    holder = await connect(address, Hello(Role.PUBLISHER, "rec-a", "", 1))
    holder.send(OpenStream(1, "held-2", FMT))
    assert isinstance(await holder.next_event(), StreamAccepted)
    caplog.set_level(logging.INFO, logger="audiosockets.relay")
    for attempt in range(5):
        claimant = await connect(address, Hello(Role.PUBLISHER, "rec-a", "", 100 + attempt))
        claimant.send(OpenStream(1, "held-2", FMT))
        refusal = await claimant.next_event()
        assert isinstance(refusal, ErrorFrame)
        assert refusal.code is ErrorCode.STREAM_IN_USE
        claimant.abort()
    refused = value(relay.metrics, "audiosockets_refusals_total", reason="stream_owned")
    assert refused == 5
    lines = [r for r in caplog.records if "already published by" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    holder.abort()


async def test_a_restarted_publishers_first_chunks_are_not_taken_as_duplicates(
    relay: Relay,
) -> None:
    """The relay holds seq 0..49 of a stream; a new run captured 60 chunks before it
    could connect. It numbered them 0..59, so the relay took 0..49 for duplicates."""
    first = Publisher(relay.url, name="rec", retry=FAST)
    stream = first.stream("restart-1", FMT)
    await first.start()
    for i in range(50):
        stream.send(block(i))
    assert await first.flush(5)
    await first.close(1.0)
    second = Publisher(relay.url, name="rec", retry=FAST)  # a new process: a new run
    stream = second.stream("restart-1", FMT)
    for i in range(60):
        stream.send(block(1000 + i))  # captured while the relay was unreachable
    await second.start()
    assert await second.flush(5)
    await second.close(1.0)
    got: list[Chunk] = []
    async with Subscriber(relay.url, "restart-1", name="s", start="earliest", retry=FAST) as sub:
        while len(got) < 110:
            got.append(await sub.get(timeout=5))
    assert [c.seq for c in got] == list(range(110))
    assert [int(c.samples[0, 0]) for c in got] == list(range(50)) + [1000 + i for i in range(60)]
    assert value(relay.metrics, "audiosockets_duplicates_suppressed_total", stream="restart-1") == 0


# --- item 2: refusals that end the client -----------------------------------------------


@pytest.mark.parametrize(
    "relay_config", [RelayConfig(host="127.0.0.1", port=0, token="right-token")]
)
async def test_record_with_a_wrong_token_exits_1_at_once(relay: Relay) -> None:
    began = time.monotonic()
    code, err = await finish(
        spawn_record("--relay", relay.url, "--token", "wrong", "--source", "synth:sine")
    )
    assert code == 1
    assert time.monotonic() - began < BOUND
    assert "refused the session: bad token" in error_line(err)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--stream", "s" * 195], "the client name (shorten --stream or set --name)"),
        (["--stream", "s" * 201], "--stream"),
        (["--stream", "ü" * 101], "--stream"),  # 202 bytes in 101 characters
        (["--name", "n" * 201], "--name"),
        (["--token", "t" * 201], "--token"),
    ],
)
async def test_record_names_over_the_wire_limit_exit_2_before_connecting(
    args: list[str], flag: str
) -> None:
    # Port 9 (discard) is closed: a check after connecting would retry, not exit.
    code, err = await finish(spawn_record("--relay", "tcp://127.0.0.1:9", *args))
    assert code == 2
    line = error_line(err)
    assert flag in line
    assert "the protocol allows 200" in line


@pytest.mark.parametrize(
    "relay_config",
    [RelayConfig(host="127.0.0.1", port=0, limits=Limits(max_frame_size=2048))],
)
async def test_record_over_the_relays_frame_limit_exits_2_naming_the_block_that_fits(
    relay: Relay,
) -> None:
    began = time.monotonic()
    code, err = await finish(
        spawn_record(
            "--relay", relay.url, "--rate", "48000", "--channels", "2", "--source", "synth:noise"
        )
    )
    assert code == 2
    assert time.monotonic() - began < BOUND
    line = error_line(err)
    # 2048 - 20 bytes of CHUNK fields = 2028 bytes: 507 stereo int16 frames, 10.56 ms.
    assert "at most 2028 bytes of audio per chunk (507 frames" in line
    assert "use --block-ms 10.5 or less" in line
    assert "all taken by the relay" not in err  # nothing was taken: never claimed
    assert value(relay.metrics, "audiosockets_chunks_received_total", stream="mic-1") == 0
    errors = relay.metrics.registry.get_sample_value(
        "audiosockets_protocol_errors_total", {"reason": "frame_too_large"}
    )
    assert not errors  # the recorder never sent a frame the relay would refuse


@pytest.mark.parametrize(
    "relay_config",
    [RelayConfig(host="127.0.0.1", port=0, limits=Limits(max_chunk_seconds=0.5))],
)
async def test_record_over_the_relays_chunk_seconds_exits_2_naming_them_and_the_block_that_fits(
    relay: Relay,
) -> None:
    """WELCOME does not carry --max-chunk-seconds: the relay's ERROR sentence does."""
    code, err = await finish(
        spawn_record(
            "--relay", relay.url, "--rate", "8000", "--block-ms", "600", "--source", "synth:noise"
        )
    )
    assert code == 2
    line = error_line(err)
    assert "the relay takes at most 0.5 s of audio per chunk (its --max-chunk-seconds" in line
    assert "use --block-ms 500 or less, or raise the relay's --max-chunk-seconds" in line


async def test_process_names_over_the_wire_limit_exit_2() -> None:
    process = spawn(
        "process", "--relay", "tcp://127.0.0.1:9", "--handler", "level", "--group", "g" * 201
    )
    code, err = await finish(process)
    assert code == 2
    assert "--group" in error_line(err)


async def test_process_with_an_empty_stream_pattern_exits_2() -> None:
    """An empty --stream (e.g. an empty AUDIOSOCKETS_PROCESS_STREAM) reconnected forever,
    a traceback every attempt ("subscription pattern must not be empty")."""
    process = spawn("process", "--relay", "tcp://127.0.0.1:9", "--handler", "level", "--stream=")
    code, err = await finish(process)
    assert code == 2
    assert "--stream must not be empty" in error_line(err)


@pytest.mark.parametrize(
    "relay_config", [RelayConfig(host="127.0.0.1", port=0, token="right-token")]
)
async def test_a_subscriber_with_a_wrong_token_ends_its_iteration_with_the_refusal(
    relay: Relay,
) -> None:
    sub = Subscriber(relay.url, "*", name="s", token="wrong", retry=FAST)
    async with sub:
        with pytest.raises(RelayRefused, match="bad token") as info:
            await asyncio.wait_for(sub.get(), BOUND)
    assert info.value.exit_code == 1
    assert sub.attempts == 1


async def refusing_relay(
    first_chunk_answer: ErrorFrame | None, answered: asyncio.Event | None = None
) -> asyncio.Server:
    """A relay that accepts the session and the stream, then answers the first CHUNK
    with ``first_chunk_answer`` and sets ``answered`` (None: takes every chunk,
    answers PING)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection("relay")
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, NeedData):
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, Hello):
                    writer.write(conn.send(Welcome("strict", 2000, 1 << 20, 0)))
                elif isinstance(event, OpenStream):
                    writer.write(conn.send(StreamAccepted(event.stream_id, 0)))
                elif isinstance(event, Ping):
                    writer.write(conn.send(Pong(event.nonce)))
                elif isinstance(event, ChunkData) and first_chunk_answer is not None:
                    writer.write(conn.send(first_chunk_answer))
                    await writer.drain()
                    if answered is not None:
                        answered.set()
                    return
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("refuse", [True, False])
async def test_a_chunk_the_relay_refused_is_never_reported_as_taken(refuse: bool) -> None:
    """flush() used to say True once chunks were written to the socket, so a recorder
    claimed "all taken by the relay" for chunks the relay had refused."""
    answer = ErrorFrame(ErrorCode.INTERNAL, "no thanks") if refuse else None
    server = await refusing_relay(answer)
    port = server.sockets[0].getsockname()[1]
    async with server:
        pub = Publisher(f"tcp://127.0.0.1:{port}", name="rec", retry=FAST)
        stream = pub.stream("mic", FMT)
        for i in range(5):
            stream.send(block(i))
        await pub.start()
        assert await pub.flush(1.5) is (not refuse)
        await pub.close(0.2)


# --- item 9: no internal-error noise on an expected path ----------------------------------


async def test_a_relay_ending_a_streaming_session_logs_no_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The relay answers a CHUNK with ERROR while the publisher keeps writing: the
    writer used to hit the closed session and log "session failed: cannot send CHUNK:
    the session is not open" as an internal error, with a traceback."""
    ended = asyncio.Event()
    caplog.set_level(logging.DEBUG, logger="audiosockets")
    server = await refusing_relay(ErrorFrame(ErrorCode.INTERNAL, "no thanks"), ended)
    port = server.sockets[0].getsockname()[1]
    async with server:
        pub = Publisher(f"tcp://127.0.0.1:{port}", name="rec", retry=FAST)
        stream = pub.stream("mic", FMT)
        await pub.start()
        for i in range(200):  # keeps writing while the relay says no
            stream.send(block(i))
            await asyncio.sleep(0.001)  # pacing the sender, not waiting on anything
        await asyncio.wait_for(ended.wait(), BOUND)
        await pub.close(0.2)
    assert "no thanks" in caplog.text  # the relay's reason is reported (as a warning)
    records = [r for r in caplog.records if r.name.startswith("audiosockets")]
    assert not [r for r in records if r.levelno >= logging.ERROR], caplog.text
    assert not [r for r in records if r.exc_info], caplog.text
    assert "session failed" not in caplog.text
    assert "cannot send CHUNK" not in caplog.text


@pytest.mark.parametrize(
    "relay_config", [RelayConfig(host="127.0.0.1", port=0, token="right-token")]
)
async def test_process_with_a_wrong_token_exits_1_at_once(relay: Relay) -> None:
    began = time.monotonic()
    code, err = await finish(
        spawn("process", "--relay", relay.url, "--token", "wrong", "--handler", "level")
    )
    assert code == 1
    assert time.monotonic() - began < BOUND
    assert "refused the session: bad token" in error_line(err)


@pytest.mark.parametrize(
    "relay_config", [RelayConfig(host="127.0.0.1", port=0, token="right-token")]
)
@pytest.mark.parametrize("client", ["library", "raw"])
async def test_loadtest_with_a_wrong_token_exits_1_with_one_line(relay: Relay, client: str) -> None:
    """It printed a child process's traceback and "Aborted!" (library), or waited 30 s
    and exited 2 with "the subscribers did not answer" (raw)."""
    code, err = await finish(
        spawn_status(
            "--relay", relay.url, "--token", "wrong", "--streams", "1", "--subscribers", "2",
            "--duration", "1", "--client", client, command="loadtest",
        ),
        timeout=20,
    )  # fmt: skip
    assert code == 1
    assert "refused the session: bad token" in error_line(err)


@pytest.mark.parametrize(
    "relay_config", [RelayConfig(host="127.0.0.1", port=0, token="right-token")]
)
async def test_status_with_a_wrong_or_overlong_token_is_one_line(relay: Relay) -> None:
    code, err = await finish(spawn_status("--relay", relay.url, "--token", "wrong"))
    assert code == 1
    assert "bad token" in error_line(err)
    code, err = await finish(spawn_status("--relay", relay.url, "--token", "t" * 201))
    assert code == 2
    assert "--token" in error_line(err)


def spawn_status(*args: str, command: str = "status") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "audiosockets", command, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
