"""``CaptureClock`` against a fake device clock (issue 13, item 8).

The fake device captures blocks of 320 frames at 16 kHz (20 ms). Its sample clock may
run fast; its reports of each block's first frame may start 0.5 s in the past and
converge over 100 blocks (what PortAudio does through PulseAudio/ALSA), jitter, lose
frames, or follow a wall-clock step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from audiosockets.capture_clock import NS_PER_S, CaptureClock

RATE = 16000
FRAMES = 320
BLOCK_NS = 20_000_000
T0 = 1_700_000_000_000_000_000
SLEW_NS = 20_000  # 1000 ppm of 20 ms: the most two stamps may differ from 20 ms


def converging_error(n: int) -> int:
    """The device's report error for block n: -0.5 s at first, exact after 100 blocks."""
    return round(-0.5 * NS_PER_S * max(0.0, 1 - n / 100))


def run(
    clock: CaptureClock,
    blocks: int,
    *,
    truth: Callable[[int], int] = lambda n: T0 + n * BLOCK_NS,
    report_error: Callable[[int], int] = lambda n: 0,
) -> tuple[list[int], list[int]]:
    """Stamp ``blocks`` blocks; return (stamps, true capture times)."""
    stamps, truths = [], []
    for n in range(blocks):
        t = truth(n)
        stamps.append(clock.stamp(FRAMES, t + report_error(n)))
        truths.append(t)
    return stamps, truths


def test_a_device_reporting_half_a_second_in_the_past_after_open_does_not_bend_the_stamps() -> None:
    """Passing the reports through gave consecutive 20 ms chunks 25 ms apart for 2 s
    (and a start 0.5 s in the past); stamps now advance by 20 ms within the slew."""
    clock = CaptureClock(RATE)
    clock.anchor(T0 + 3_000_000)  # the anchor from the first callback: 3 ms late
    stamps, truths = run(clock, 3000, report_error=converging_error)
    steps = np.diff(stamps)
    assert np.all(np.abs(steps - BLOCK_NS) <= SLEW_NS)
    error = np.array(stamps) - np.array(truths)
    assert np.max(np.abs(error)) <= 3_500_000  # the anchor was 3 ms late; the reports add < 0.5
    assert np.max(np.abs(error[-500:])) <= 100_000  # then it converges onto the device
    assert clock.steps == 0
    assert clock.lost_frames == 0
    # What passing the reports through did: 25 ms steps while they converge.
    raw = np.diff([t + converging_error(n) for n, t in enumerate(truths[:100])])
    assert raw[0] == 25_000_000


def test_a_sample_clock_100_ppm_fast_is_followed() -> None:
    fast = 1 + 100e-6

    def truth(n: int) -> int:
        return T0 + round(n * BLOCK_NS / fast)

    clock = CaptureClock(RATE)
    clock.anchor(T0)
    stamps, truths = run(clock, 30_000, truth=truth)  # 10 minutes
    error = np.array(stamps) - np.array(truths)
    assert np.max(np.abs(error)) <= 150_000  # drift × smoothing: 100 ppm × 1 s = 0.1 ms
    assert np.all(np.abs(np.diff(stamps) - BLOCK_NS) <= SLEW_NS)
    # The frame counter alone would be 60 ms late by then.
    assert truths[-1] - (T0 + 29_999 * BLOCK_NS) == pytest.approx(-60_000_000, rel=0.01)


def test_jittery_reports_without_an_adc_time_do_not_jitter_the_stamps() -> None:
    rng = np.random.default_rng(7)
    jitter = rng.uniform(-2_000_000, 2_000_000, 5000).round().astype(int)
    clock = CaptureClock(RATE)
    clock.anchor(T0)
    stamps, truths = run(clock, 5000, report_error=lambda n: int(jitter[n]))
    assert np.all(np.abs(np.diff(stamps) - BLOCK_NS) <= SLEW_NS)
    assert np.max(np.abs(np.array(stamps) - np.array(truths))) <= 1_000_000


def test_frames_lost_in_an_overflow_advance_the_stamp_by_exactly_what_was_lost() -> None:
    clock = CaptureClock(RATE)
    clock.anchor(T0)
    stamps = [clock.stamp(FRAMES, T0 + n * BLOCK_NS) for n in range(200)]
    # 10 blocks never reach us; the device flags an overflow and reports the true time.
    after = clock.stamp(FRAMES, T0 + 210 * BLOCK_NS, overflow=True)
    assert after - stamps[-1] == 11 * BLOCK_NS
    assert clock.lost_frames == 10 * FRAMES
    nxt = clock.stamp(FRAMES, T0 + 211 * BLOCK_NS)
    assert nxt - after == BLOCK_NS


def test_an_overflow_without_loss_and_during_convergence_loses_nothing() -> None:
    clock = CaptureClock(RATE)
    clock.anchor(T0)
    stamps = []
    for n in range(100):  # reports converge 5 ms per block: not a loss
        stamps.append(clock.stamp(FRAMES, T0 + n * BLOCK_NS + converging_error(n), overflow=True))
    assert clock.lost_frames == 0
    assert np.all(np.abs(np.diff(stamps) - BLOCK_NS) <= SLEW_NS)


def test_frames_the_caller_knows_it_lost_advance_the_stamp() -> None:
    clock = CaptureClock(RATE)
    clock.anchor(T0)
    first = clock.stamp(FRAMES)
    second = clock.stamp(FRAMES, lost_frames=3 * FRAMES)  # three blocks: ring full
    assert second - first == 4 * BLOCK_NS
    assert clock.lost_frames == 3 * FRAMES


def test_a_reopen_restarts_the_count_and_never_goes_backwards() -> None:
    clock = CaptureClock(RATE)
    assert clock.anchor(T0) == 0
    last = [clock.stamp(FRAMES) for _ in range(50)][-1]
    end = last + BLOCK_NS
    # Reopened 1.5 s later: the gap is reported, stamps continue from the new anchor.
    assert clock.anchor(end + 1_500_000_000) == 1_500_000_000
    assert clock.stamp(FRAMES) == end + 1_500_000_000
    # A new anchor before the end of the last block (clock read early): clamped.
    end = clock.next_ns
    assert clock.anchor(end - 7_000_000) == 0
    assert clock.stamp(FRAMES) == end


def test_a_wall_clock_step_is_followed_once_after_it_lasted() -> None:
    """An edge PC without an RTC: NTP sets the clock an hour forward mid-run."""
    step = 3600 * NS_PER_S
    clock = CaptureClock(RATE)
    clock.anchor(T0)

    def truth(n: int) -> int:
        return T0 + n * BLOCK_NS + (step if n >= 1000 else 0)

    stamps, truths = run(clock, 2000, truth=truth)
    assert clock.steps == 1
    jumps = [i for i, d in enumerate(np.diff(stamps)) if abs(d - BLOCK_NS) > SLEW_NS]
    assert len(jumps) == 1
    assert 1000 + 240 <= jumps[0] + 1 <= 1000 + 260  # after 5 s of audio, no sooner
    assert abs(stamps[-1] - truths[-1]) <= 1_000_000


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        CaptureClock(0)
    with pytest.raises(ValueError, match="slew"):
        CaptureClock(RATE, max_slew_ppm=0)
    clock = CaptureClock(RATE)
    with pytest.raises(RuntimeError, match="anchor"):
        clock.stamp(FRAMES)
