"""A subscriber that subscribes and then never reads: one per system, from the parent.

The socket's receive buffer is kept small so the relay's side fills quickly; what
the relay does with the rest (bound it and count drops, block the publisher, or
buffer it without limit) shows in its RSS and in the healthy subscriber's loss.
"""

from __future__ import annotations

import socket

from wyoming.event import Event, read_event, write_event

from audiosockets.protocol import (
    Connection,
    Hello,
    NeedData,
    Role,
    StartPosition,
    Subscribe,
    Welcome,
)

from .wyoming_relay import SUBSCRIBE, SUBSCRIBED

RCVBUF = 16 << 10


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def stalled_subscriber(system: str, url: str) -> socket.socket:
    """Open a subscription to every stream on ``system``'s relay and return its socket,
    which the caller holds without reading until it closes it."""
    sock = _connect(url)
    if system in ("library", "raw"):
        conn = Connection("client")
        sock.sendall(conn.send(Hello(Role.SUBSCRIBER, "stalled")))
        while conn.welcome is None:
            event = conn.next_event()
            if isinstance(event, NeedData):
                conn.receive_data(sock.recv(65536))
            elif not isinstance(event, Welcome):
                raise ConnectionError(f"relay answered the stalled subscriber with {event}")
        sock.sendall(conn.send(Subscribe("load-*", "", StartPosition.LIVE)))
    elif system == "forwarder":
        sock.sendall(b"S")
        sock.recv(1)
    elif system == "wyoming":
        with sock.makefile("wb") as out:
            write_event(Event(SUBSCRIBE, {"name": "stalled"}), out)
        with sock.makefile("rb") as inp:
            reply = read_event(inp)
        if reply is None or reply.type != SUBSCRIBED:
            raise ConnectionError(f"wyoming relay answered the stalled subscriber with {reply}")
    else:
        raise ValueError(f"unknown system {system!r}")
    return sock
