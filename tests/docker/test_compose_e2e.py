"""compose.yaml on the real Docker engine: scaling, crashes, a relay restart, a network cut.

One scenario runs once per module (building the images first, cached) and
collects evidence; each test then asserts one promise from it:

- three recorders (three streams), ``processor-archive`` scaled to three
  replicas in one relay group, one fan-out archive processor outside any group;
- every stream is handled by exactly one replica;
- ``docker kill`` of a replica moves its streams to the others;
- ``docker-compose restart relay`` and a ``docker network disconnect`` of a
  recorder for longer than the relay's dead-peer timeout lose no chunk;
- so, at the end, the fan-out processor's archive holds every seq of every
  stream from 0 to the last one the relay saw, and so does the group's.

Evidence comes from the services only: the relay's ``status --json``, the
containers' metrics endpoints, and the archive files (bind-mounted).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from docker_harness import (
    HERE,
    ROOT,
    Compose,
    Scrape,
    Segment,
    archived_segments,
    docker,
    health,
    inspect,
    missing_seqs,
    poll,
    scrape,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

STREAMS = ("e2e-a", "e2e-b", "e2e-c")
RECORDERS = ("rec-a", "rec-b", "rec-c")
GROUP = "archive"
GROUP_SERVICE = "processor-archive"
REPLICAS = 3
PROCESSOR_METRICS = 9402
RECORDER_METRICS = 9401
PROCESSED = "audiosockets_chunks_processed_total"


def must(predicate: Callable[[], bool], timeout: float, what: str, compose: Compose) -> None:
    if not poll(predicate, timeout):
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{compose.logs()}")


@dataclass
class Evidence:
    workdir: Path
    owners_before_kill: dict[str, list[int]] = field(default_factory=dict)
    victim: int = -1
    victim_streams: list[str] = field(default_factory=list)
    owners_after_kill: dict[str, list[int]] = field(default_factory=dict)
    group_members_after_kill: int = -1
    relay_uptime_before_restart: float = 0.0
    relay_uptime_after_restart: float = 0.0
    drops_before_restart: dict[str, float] = field(default_factory=dict)
    outage_noticed_by_relay: bool = False
    recorder_drops: dict[str, float] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    fanout_caught_up: bool = False
    fanout: Scrape | None = None
    drops_final: dict[str, float] = field(default_factory=dict)
    fanout_segments: list[Segment] = field(default_factory=list)
    group_segments: list[Segment] = field(default_factory=list)
    exit_codes: dict[str, int] = field(default_factory=dict)
    lockdown: dict[str, dict[str, Any]] = field(default_factory=dict)


def owners(replicas: list[str], streams: tuple[str, ...] | list[str]) -> dict[str, list[int]]:
    """Replica indexes whose handler processed chunks of each stream."""
    result: dict[str, list[int]] = {s: [] for s in streams}
    for index, container in enumerate(replicas):
        if health(container) == "exited":
            continue
        metrics = scrape(container, PROCESSOR_METRICS)
        for s in streams:
            if metrics.value(PROCESSED, stream=s) > 0:
                result[s].append(index)
    return result


def stream_table(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status["streams"]}


def lockdown_of(container: str) -> dict[str, Any]:
    """How the engine runs a container, and what a write to its root and /tmp does."""
    info = inspect(container)
    host = info["HostConfig"]
    probe = subprocess.run(
        ["docker", "exec", container, "python", "-c", WRITE_PROBE],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return {
        "read_only": host["ReadonlyRootfs"],
        "cap_drop": host["CapDrop"],
        "cap_add": host["CapAdd"],
        "privileged": host["Privileged"],
        "security_opt": host["SecurityOpt"],
        "uid": probe.stdout.split()[0] if probe.returncode == 0 else probe.stderr,
        "writes": probe.stdout.split()[1:],
        "effective_caps": probe.stdout.split()[-1] if probe.returncode == 0 else "",
    }


# Run inside each container: its uid, then whether / and /tmp take a file, then
# the effective capability set (CapEff from /proc).
WRITE_PROBE = """
import os, tempfile
print(os.getuid(), end=" ")
for d in ("/", "/tmp"):
    try:
        tempfile.TemporaryFile(dir=d).close()
        print(d + ":written", end=" ")
    except OSError as e:
        print(d + ":" + (os.strerror(e.errno) if e.errno else str(e)).replace(" ", "_"), end=" ")
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")]
print(caps[0])
"""


def run_scenario(compose: Compose, ev: Evidence) -> None:
    compose.up(["relay", "fanout", GROUP_SERVICE], scale={GROUP_SERVICE: REPLICAS})
    replicas = compose.containers(GROUP_SERVICE)
    fanout = compose.containers("fanout")[0]
    assert len(replicas) == REPLICAS
    must(
        lambda: all(health(c) == "healthy" for c in [*replicas, fanout]),
        90,
        "healthy processors",
        compose,
    )
    must(
        lambda: len(compose.relay_status()["subscribers"]) == REPLICAS + 1,
        30,
        "all processors subscribed",
        compose,
    )

    # Streams start only now: the fan-out processor (start=earliest) sees seq 0.
    compose.up(RECORDERS)

    def streams_flowing(minimum: int) -> bool:
        status = compose.relay_status()
        table = stream_table(status)
        assignment = status["groups"][GROUP]["assignment"]
        return all(
            s in table and table[s]["last_seq"] >= minimum and s in assignment for s in STREAMS
        )

    must(lambda: streams_flowing(100), 60, "three streams flowing and assigned", compose)
    ev.lockdown = {
        f"{name}/{container[:12]}": lockdown_of(container)
        for name in ("relay", "fanout", GROUP_SERVICE, *RECORDERS)
        for container in compose.containers(name)
    }
    must(
        lambda: all(owners(replicas, STREAMS).values()),
        30,
        "every stream processed by a replica",
        compose,
    )
    ev.owners_before_kill = owners(replicas, STREAMS)

    # Crash the replica holding the most streams.
    held = {i: [s for s, os_ in ev.owners_before_kill.items() if i in os_] for i in range(REPLICAS)}
    ev.victim = max(held, key=lambda i: len(held[i]))
    ev.victim_streams = held[ev.victim]
    docker("kill", replicas[ev.victim])
    must(
        lambda: len(compose.relay_status()["groups"][GROUP]["members"]) == REPLICAS - 1,
        30,
        "the relay dropping the killed replica from the group",
        compose,
    )
    ev.group_members_after_kill = len(compose.relay_status()["groups"][GROUP]["members"])
    survivors = [c for i, c in enumerate(replicas) if i != ev.victim]
    poll(lambda: all(owners(survivors, ev.victim_streams).values()), 30)
    ev.owners_after_kill = {
        s: [replicas.index(survivors[i]) for i in idx]
        for s, idx in owners(survivors, ev.victim_streams).items()
    }

    # Restart the relay: it comes back empty; recorders re-send from their spool.
    before = compose.relay_status()
    ev.relay_uptime_before_restart = float(before["uptime_s"])
    ev.drops_before_restart = dict(before["drops"])
    seq_before = {s: t["last_seq"] for s, t in stream_table(before).items()}
    compose.run("restart", "relay")

    def recovered(previous: dict[str, int]) -> bool:
        status = compose.relay_status()
        table = stream_table(status)
        return (
            len(status["publishers"]) == len(RECORDERS)
            and len(status["subscribers"]) == (REPLICAS - 1) + 1  # survivors + fan-out
            and all(table[s]["last_seq"] > previous[s] + 50 for s in STREAMS)
        )

    must(lambda: recovered(seq_before), 60, "recovery after the relay restart", compose)
    ev.relay_uptime_after_restart = float(compose.relay_status()["uptime_s"])

    # Cut rec-a off the network until the relay has declared it dead.
    rec_a = compose.containers("rec-a")[0]
    seq_before = {s: t["last_seq"] for s, t in stream_table(compose.relay_status()).items()}
    docker("network", "disconnect", compose.network(), rec_a)
    try:
        ev.outage_noticed_by_relay = poll(
            lambda: stream_table(compose.relay_status())["e2e-a"]["publisher"] is None, 30
        )
    finally:
        docker("network", "connect", compose.network(), rec_a)
    must(lambda: recovered(seq_before), 60, "recovery after the network cut", compose)

    for name in RECORDERS:
        metrics = scrape(compose.containers(name)[0], RECORDER_METRICS)
        ev.recorder_drops[name] = metrics.value("audiosockets_chunks_dropped_total")

    # Recorders stop gracefully (flush), then everything drains.
    compose.run("stop", *RECORDERS)
    final = compose.relay_status()
    ev.last_seq = {s: t["last_seq"] for s, t in stream_table(final).items()}
    ev.fanout_caught_up = poll(
        lambda: all(
            scrape(fanout, PROCESSOR_METRICS).value(PROCESSED, stream=s) >= ev.last_seq[s] + 1
            for s in STREAMS
        ),
        30,
    )
    poll(lambda: all(sub["lag_chunks"] == 0 for sub in compose.relay_status()["subscribers"]), 30)
    ev.fanout = scrape(fanout, PROCESSOR_METRICS)
    ev.drops_final = dict(compose.relay_status()["drops"])
    compose.run("stop", "fanout", GROUP_SERVICE)  # closes the open segments
    compose.run("stop", "relay")
    survivors_and_rest = {
        **{name: compose.containers(name)[0] for name in (*RECORDERS, "fanout", "relay")},
        **{f"{GROUP_SERVICE}_{replicas.index(c) + 1}": c for c in survivors},
    }
    ev.exit_codes = {
        name: int(inspect(c)["State"]["ExitCode"]) for name, c in survivors_and_rest.items()
    }
    ev.fanout_segments = archived_segments(ev.workdir / "fanout")
    ev.group_segments = archived_segments(ev.workdir / "group")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, service_images: str) -> Iterator[Evidence]:
    tag = service_images
    workdir = tmp_path_factory.mktemp("compose-e2e")
    for sub in ("group", "fanout"):
        (workdir / sub).mkdir()
        (workdir / sub).chmod(0o777)  # the services run as uid 10001
    compose = Compose(
        f"audiosockets-e2e-{os.getpid()}",
        [ROOT / "compose.yaml", HERE / "compose.e2e.yaml"],
        {"E2E_DIR": str(workdir), "AUDIOSOCKETS_IMAGE_TAG": tag, "RELAY_PUBLISH": "127.0.0.1:"},
    )
    evidence = Evidence(workdir)
    try:
        run_scenario(compose, evidence)
        (workdir / "compose.log").write_text(compose.logs())
        yield evidence
    finally:
        compose.down()


def test_every_stream_is_handled_by_exactly_one_replica(e2e: Evidence) -> None:
    assert set(e2e.owners_before_kill) == set(STREAMS)
    assert all(len(o) == 1 for o in e2e.owners_before_kill.values()), e2e.owners_before_kill


def test_a_killed_replicas_streams_move_to_a_survivor(e2e: Evidence) -> None:
    assert e2e.victim_streams, "the killed replica held no stream"
    assert e2e.group_members_after_kill == REPLICAS - 1
    for stream in e2e.victim_streams:
        assert len(e2e.owners_after_kill[stream]) == 1, e2e.owners_after_kill
        assert e2e.owners_after_kill[stream] != [e2e.victim]


def test_the_relay_really_restarted_and_the_outage_was_noticed(e2e: Evidence) -> None:
    # Guards the loss checks below against faults that never happened.
    assert e2e.relay_uptime_after_restart < e2e.relay_uptime_before_restart
    assert e2e.outage_noticed_by_relay


def test_services_exit_cleanly_on_sigterm(e2e: Evidence) -> None:
    # tini as PID 1 hands `docker stop`'s SIGTERM on; 137 would mean the grace
    # period ran out and SIGKILL followed.
    assert e2e.exit_codes
    assert e2e.exit_codes == dict.fromkeys(e2e.exit_codes, 0)


def test_nothing_was_dropped(e2e: Evidence) -> None:
    assert e2e.drops_before_restart == {}
    assert e2e.drops_final == {}
    assert e2e.recorder_drops == dict.fromkeys(RECORDERS, 0.0)


def test_fanout_processor_got_every_chunk_once_in_order(e2e: Evidence) -> None:
    assert e2e.fanout is not None
    assert e2e.fanout_caught_up
    for s in STREAMS:
        assert e2e.last_seq[s] > 0
        assert e2e.fanout.value(PROCESSED, stream=s) == e2e.last_seq[s] + 1, s
        assert e2e.fanout.value("audiosockets_sequence_gaps_total", stream=s) == 0, s


def test_fanout_archive_holds_every_seq_without_gaps(e2e: Evidence) -> None:
    segments = e2e.fanout_segments
    assert all(seg.closed for seg in segments), "a segment was left unfinished"
    assert not [seg for seg in segments if seg.gap_before or seg.gap_after]
    for s in STREAMS:
        assert missing_seqs(segments, s, e2e.last_seq[s]) == [], s


def test_group_archive_holds_every_seq_across_the_handover(e2e: Evidence) -> None:
    # The killed replica's unfinished .part counts for what it had written.
    for s in STREAMS:
        missing = missing_seqs(e2e.group_segments, s, e2e.last_seq[s])
        assert missing == [], (
            f"{s}: {len(missing)} seq(s) missing, first {missing[:5]}; segments: "
            + json.dumps([seg.__dict__ for seg in e2e.group_segments if seg.stream == s])
        )


def test_every_container_ran_locked_down(e2e: Evidence) -> None:
    # compose.yaml's lockdown as the engine applied it, and what it does: the
    # root filesystem refuses a file, /tmp (tmpfs) takes one, no capability
    # is in effect, and nobody is root.
    assert len(e2e.lockdown) == 1 + 1 + REPLICAS + len(RECORDERS)
    for container, seen in e2e.lockdown.items():
        assert seen["read_only"] is True, container
        assert seen["cap_drop"] == ["ALL"], container
        assert not seen["cap_add"], container
        assert seen["privileged"] is False, container
        assert "no-new-privileges:true" in seen["security_opt"], container
        assert seen["uid"] == "10001", (container, seen)
        assert seen["writes"][:2] == ["/:Read-only_file_system", "/tmp:written"], (container, seen)
        assert int(seen["effective_caps"], 16) == 0, (container, seen)
