"""``audiosockets nats init`` and ``audiosockets status`` for a JetStream stream.

``init_stream`` creates (or updates) the stream with explicit settings, e.g. 3
replicas on a cluster, or a central stream that sources the edge sites' streams
over leaf nodes. ``fetch_status`` builds the same kind of report as the relay's
STATUS (streams with their newest seq and capture time, groups with members and
assignments) from the stream's state and the group buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats.errors
import nats.js.errors

from ..errors import ConfigError, RelayUnreachable
from ..metrics import Metrics
from ..urls import NatsAddress
from .connection import NatsLink, address_of, settings_of, stream_config
from .mapping import CAPTURED, END, EVENT, SEQ, NatsSettings, stream_name_of


async def _open(
    url: str | NatsAddress, settings: NatsSettings | None, token: str, timeout: float
) -> NatsLink:
    address = address_of(url)
    link = NatsLink(
        address,
        name="audiosockets-admin",
        role_label="observer",
        token=token,
        metrics=Metrics(),
        settings=settings_of(address, settings),
        connect_timeout=timeout,
    )
    try:
        async with asyncio.timeout(timeout):
            await link.connect()
    except TimeoutError:
        await link.close()
        raise RelayUnreachable(
            f"no NATS server of {address} answered within {timeout:g} s"
        ) from None
    return link


async def init_stream(
    url: str | NatsAddress,
    settings: NatsSettings,
    *,
    sources: tuple[str, ...] = (),
    token: str = "",
    timeout: float = 10.0,
) -> str:
    """Create the stream, or bring an existing one to ``settings``; returns a sentence."""
    link = await _open(url, settings, token, timeout)
    js = link.js
    assert js is not None
    config = stream_config(settings, sources=sources)
    try:
        try:
            await js.stream_info(settings.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            verb = "created"
        else:
            await js.update_stream(config)
            verb = "updated"
    except nats.js.errors.APIError as exc:
        raise ConfigError(
            f"JetStream refused stream {settings.stream!r}: {exc.description}"
        ) from exc
    finally:
        await link.close()
    where = f"sourcing {', '.join(sources)}" if sources else f"subjects {settings.prefix}.>"
    return (
        f"{verb} JetStream stream {settings.stream} ({where}, {settings.replicas} replica(s), "
        f"{settings.max_age:g} s retention)"
    )


async def fetch_status(
    url: str | NatsAddress, *, timeout: float = 5.0, token: str = ""
) -> dict[str, Any]:
    """Streams (newest seq, capture time, chunks held) and groups of the stream."""
    link = await _open(url, None, token, timeout)
    js = link.js
    assert js is not None
    settings = link.settings
    try:
        async with asyncio.timeout(timeout):
            info = await js.stream_info(settings.stream, subjects_filter=f"{settings.prefix}.>")
            streams: list[dict[str, Any]] = []
            for subject, count in sorted((info.state.subjects or {}).items()):
                try:
                    name = stream_name_of(subject.rpartition(".")[2])
                except Exception:
                    continue
                entry: dict[str, Any] = {"name": name, "chunks_held": count}
                with contextlib.suppress(nats.js.errors.Error):
                    last = await js.get_last_msg(settings.stream, subject)
                    headers = last.headers or {}
                    entry["last_seq"] = int(headers.get(SEQ, "-1"))
                    entry["ended"] = headers.get(EVENT) == END
                    if CAPTURED in headers:
                        entry["last_captured_ns"] = int(headers[CAPTURED])
                streams.append(entry)
            groups = await _groups(js, settings)
    except TimeoutError:
        raise RelayUnreachable(f"NATS {link.address} did not answer within {timeout:g} s") from None
    except nats.js.errors.NotFoundError:
        raise RelayUnreachable(
            f"NATS {link.address} has no JetStream stream {settings.stream!r}"
        ) from None
    finally:
        await link.close()
    return {
        "binding": "nats",
        "server": str(link.address),
        "stream": settings.stream,
        "subjects": f"{settings.prefix}.>",
        "replicas": info.config.num_replicas,
        "replay_window_seconds": info.config.max_age,
        "messages": info.state.messages,
        "bytes": info.state.bytes,
        "streams": streams,
        "groups": groups,
    }


async def _groups(js: Any, settings: NatsSettings) -> list[dict[str, Any]]:
    try:
        kv = await js.key_value(settings.groups_bucket)
        keys = await kv.keys()
    except (nats.js.errors.Error, nats.errors.Error):
        return []
    groups = []
    for key in sorted(k for k in keys if "." not in k):
        with contextlib.suppress(nats.js.errors.Error, ValueError):
            state = json.loads((await kv.get(key)).value or b"{}")
            assignment: dict[str, str] = state.get("assignment", {})
            members: dict[str, list[str]] = {}
            for stream, member in sorted(assignment.items()):
                members.setdefault(member, []).append(stream)
            groups.append({"name": stream_name_of(key), "members": members})
    return groups


def format_status(report: dict[str, Any]) -> str:
    """``audiosockets status`` for a JetStream stream: one line per stream and group."""
    lines = [
        f"nats {report['server']}: stream {report['stream']} ({report['subjects']}), "
        f"{report['replicas']} replica(s), replay {report['replay_window_seconds']:g} s, "
        f"{report['messages']} chunks held, {report['bytes']} bytes",
        "",
        f"{'STREAM':<32} {'LAST SEQ':>10} {'HELD':>8}  LAST CAPTURE",
    ]
    for s in report["streams"]:
        captured = s.get("last_captured_ns")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(captured / 1e9)) + " UTC"
            if captured
            else "-"
        )
        if s.get("ended"):
            when = "ended"
        lines.append(f"{s['name']:<32} {s.get('last_seq', -1):>10} {s['chunks_held']:>8}  {when}")
    for group in report["groups"]:
        lines.append("")
        lines.append(f"group {group['name']}:")
        for member, streams in sorted(group["members"].items()):
            lines.append(f"  {member}: {', '.join(streams)}")
    return "\n".join(lines)
