"""Per-frame limits of the codec (issue 11, items 1 and 2), byte by byte and
without sockets: what each frame type may weigh, empty chunks."""

from __future__ import annotations

import pytest

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.errors import ErrorCode, LocalProtocolError
from audiosockets.protocol import ChunkData, OpenStream, Role, encode_chunk
from test_protocol import handshake, remote_error

MONO16 = AudioFormat(16000, 1, SampleType.INT16)


def test_an_empty_chunk_is_refused_both_ways() -> None:
    client, relay = handshake(Role.PUBLISHER)
    relay.receive_data(client.send(OpenStream(1, "m", MONO16)))
    relay.next_event()
    with pytest.raises(LocalProtocolError):
        client.chunk_frame(1, 0, 0, b"")
    err = remote_error(relay, encode_chunk(1, 0, 0, b""))
    assert err.code is ErrorCode.BAD_FORMAT
    assert err.reason == "empty_chunk"
    # One frame is enough.
    client2, relay2 = handshake(Role.PUBLISHER)
    relay2.receive_data(client2.send(OpenStream(1, "m", MONO16)))
    relay2.next_event()
    relay2.receive_data(client2.send(ChunkData(1, 0, 0, b"\x00\x00")))
    assert relay2.next_event() == ChunkData(1, 0, 0, b"\x00\x00")
