"""``python -m tests.benchmarks [--quick] [--only ROWS] [--soak-seconds S]``: run, print, save.

Prints the table (Markdown, as the README shows it) and the issue's targets with what
was measured, and writes ``tests/benchmarks/results/<utc time>-<mode>.json`` with the
machine, the commit and every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from audiosockets import loops

from .harness import PROFILE_ENV, SYSTEMS
from .scenarios import FULL, QUICK, ROWS, Row

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[2]

# The relay's own bounds on one stalled subscriber: its kernel send buffer
# (RelayConfig.socket_buffer_bytes) plus one batch being written (max_batch_bytes).
STALL_BOUND_MB = (1 << 20) / 2**20 + (256 << 10) / 2**20


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    factory = loops.loop_factory("auto")
    if factory is None:
        loop = "asyncio"
    else:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loop": loop,
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
    }


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--", "services")
    return f"{head}{' + uncommitted changes in services/' if dirty else ''}"


def table(rows: list[Row]) -> str:
    keys = [k for k in SYSTEMS if any(k in r.cells for r in rows)]
    lines = [
        "| row | " + " | ".join(SYSTEMS[k].title for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(r.cells.get(k, "–") for k in keys) + " |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[tuple[str, str, bool]]:
    """The issue's targets, each with what this run measured and whether it is met."""
    found: list[tuple[str, str, bool]] = []
    for r in rows:
        f = r.figures
        if r.name.startswith("streams scale"):
            held = f["library"]["held"]
            at_1000 = [s for s in f["library"]["steps"] if s["streams"] == 1000]
            found.append(
                ("1000 realtime streams, 0 loss, p99 ≤ 50 ms", f"{held} held", held >= 1000)
            )
            if at_1000:
                us = at_1000[0]["relay_cpu_us_per_chunk_in"]
                found.append(
                    ("relay ingest ≤ 8 µs CPU per chunk (1000 streams)", f"{us} µs", us <= 8)
                )
        elif r.name.startswith("one subscriber"):
            rate = f["library"]["deliveries_per_s"]
            found.append(("one Subscriber ≥ 120k chunks/s", f"{rate:,.0f}/s", rate >= 120_000))
        elif r.name.startswith("realtime 1 → 16"):
            p99 = f["library"]["latency_ms"]["p99"]
            ref = f["forwarder"]["latency_ms"]["p99"]
            found.append(("realtime 1 → 16 p99 ≤ 2 ms", f"{p99:.2f} ms", p99 <= 2))
            found.append(
                (
                    "… and ≤ 1.2x the forwarder's p99",
                    f"{p99 / ref:.2f}x ({ref:.2f} ms)",
                    p99 <= 1.2 * ref,
                )
            )
        elif r.name.startswith("fan-out 1 → 16,"):
            ref = f["forwarder"]["deliveries_per_s"]
            lib = f["library"]["deliveries_per_s"] / ref
            raw = f["raw"]["deliveries_per_s"] / ref
            found.append(("fan-out 1 → 16 library ≥ 0.5x forwarder", f"{lib:.2f}x", lib >= 0.5))
            found.append(("fan-out 1 → 16 raw readers ≥ 4x forwarder", f"{raw:.2f}x", raw >= 4))
        elif r.name.startswith("stalled"):
            rss = f["library"]["relay_rss_mb"]
            grew = rss["during"] - rss["during_without_stall"]
            found.append(
                (
                    f"stalled subscriber costs the relay ≤ its bounds ({STALL_BOUND_MB:.2f} MB)",
                    f"+{grew:.1f} MB",
                    grew <= STALL_BOUND_MB,
                )
            )
        elif r.name.startswith("soak"):
            series = [mb for _t, mb in f["library"]["relay_rss_mb_every_10s"]]
            p99s = f["library"]["p99_ms_per_tenth"]
            half = series[len(series) // 2 :]
            drift = max(half) - min(half) if half else 0.0
            found.append(
                ("soak: RSS flat (second half within 5 MB)", f"{drift:.1f} MB", drift <= 5)
            )
            found.append(
                ("soak: p99 flat (each tenth ≤ 50 ms)", f"max {max(p99s):.1f} ms", max(p99s) <= 50)
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per step")
    parser.add_argument(
        "--only", default=",".join(ROWS), help=f"comma-separated rows of: {', '.join(ROWS)}"
    )
    parser.add_argument(
        "--soak-seconds", type=float, help="the soak's length (alone: 3600 for the 1-hour soak)"
    )
    parser.add_argument("--soak-streams", type=int, help="the soak's stream count")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile the audiosockets relay (pyinstrument) and write each run's profile to DIR",
    )
    args = parser.parse_args(argv)
    durations = QUICK if args.quick else FULL
    if args.soak_seconds:
        durations = replace(durations, soak=args.soak_seconds)
    if args.soak_streams:
        durations = replace(durations, soak_streams=args.soak_streams)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile.resolve())  # inherited by the children
    mode = "quick" if args.quick else "full"
    started = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    about = {"machine": machine(), "commit": commit(), "mode": mode, "started_utc": started}
    print(json.dumps(about), flush=True)
    rows: list[Row] = []
    for name in wanted:
        print(f"{name}:", flush=True)
        rows.extend(ROWS[name](durations))
    print()
    print(table(rows))
    print()
    checks = targets(rows)
    for what, measured, met in checks:
        print(f"{'met   ' if met else 'MISSED'}  {what}: {measured}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{started}-{mode}.json"
    document = {
        **about,
        "command": "python -m tests.benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "durations": asdict(durations),
        "rows": [{"row": r.name, "cells": r.cells, "figures": r.figures} for r in rows],
        "targets": [{"target": w, "measured": m, "met": ok} for w, m, ok in checks],
        "table_markdown": table(rows),
    }
    out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
