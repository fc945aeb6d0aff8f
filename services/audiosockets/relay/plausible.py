"""What a CHUNK may claim: sequence numbers and capture times a real
publisher can produce. Pure decisions over plain numbers; the relay refuses
the rest as protocol errors before anything is counted or stored.

- A sequence number is at most ``MAX_SEQ`` (2**63 - 1), so ``next_seq`` and
  every gap fit the wire's u64 and no counter is poisoned by 1.8e19.
- The first chunk of a stream the relay holds nothing of (a new stream, or a
  relay that restarted empty) may carry any number up to ``MAX_FIRST_SEQ``
  (2**48: 8900 years of 1 ms chunks), leaving the real publisher room to go on
  after a forged one.
- After that, a jump ahead can only cover chunks the publisher captured since
  the relay last heard from the stream: a chunk holds at least one frame, so
  at most ``rate`` chunks per second of the relay's own clock (which a client
  cannot forge), plus ``SEQ_JUMP_SLACK_SECONDS``.
- The capture time is within ``max_capture_ahead`` seconds ahead of the
  relay's wall clock and ``max_capture_age`` behind it.

Positions a subscriber claims are clamped, not refused: an ACK to the highest
seq actually sent to that member, a resume point to the stream's newest seq
(``clamp``); each clamp is counted in
``audiosockets_positions_clamped_total{reason}``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from ..errors import ErrorCode, RemoteProtocolError

if TYPE_CHECKING:
    from .server import Relay

log = logging.getLogger("audiosockets.relay")

MAX_SEQ: Final = 2**63 - 1
MAX_FIRST_SEQ: Final = 2**48
SEQ_JUMP_SLACK_SECONDS: Final = 60.0


def check_seq(seq: int, last_seq: int, rate: int, quiet_seconds: float) -> None:
    """Refuse ``seq`` unless a real publisher could send it next.

    ``last_seq``: the stream's newest seq on the relay (-1: none);
    ``rate``: the stream's sample rate (Hz), the most chunks per second;
    ``quiet_seconds``: relay clock since the stream's last chunk arrived.
    Raises ``RemoteProtocolError`` (MALFORMED_FRAME, reason ``seq_jump``).
    """
    if seq > MAX_SEQ:
        raise RemoteProtocolError(
            f"sequence number {seq} is above {MAX_SEQ}", ErrorCode.MALFORMED_FRAME, "seq_jump"
        )
    if last_seq < 0:
        if seq > MAX_FIRST_SEQ:
            raise RemoteProtocolError(
                f"first sequence number {seq} is implausibly high (over 2**48)",
                ErrorCode.MALFORMED_FRAME,
                "seq_jump",
            )
        return
    missing = seq - last_seq - 1
    if missing > 0:
        allowed = int(rate * (max(0.0, quiet_seconds) + SEQ_JUMP_SLACK_SECONDS))
        if missing > allowed:
            raise RemoteProtocolError(
                f"sequence jumps from {last_seq} to {seq}: {missing} chunks missing, more than "
                f"a {rate} Hz stream can produce in {quiet_seconds:.1f} s",
                ErrorCode.MALFORMED_FRAME,
                "seq_jump",
            )


def check_capture_time(
    captured_ns: int, now_ns: int, max_ahead_seconds: float, max_age_seconds: float
) -> None:
    """Refuse a capture time further than ``max_ahead_seconds`` ahead of the
    relay's wall clock ``now_ns`` or ``max_age_seconds`` behind it (both ns
    since the Unix epoch). Raises ``RemoteProtocolError`` (MALFORMED_FRAME,
    reason ``capture_time``)."""
    ahead = captured_ns - now_ns
    if ahead > max_ahead_seconds * 1e9 or -ahead > max_age_seconds * 1e9:
        raise RemoteProtocolError(
            f"capture time {captured_ns} ns is {ahead / 1e9:+.0f} s from the relay's clock "
            f"(allowed: {max_ahead_seconds:g} s ahead, {max_age_seconds:g} s behind)",
            ErrorCode.MALFORMED_FRAME,
            "capture_time",
        )


def clamp(relay: Relay, reason: str, claimed: int, limit: int, what: str) -> int:
    """``min(claimed, limit)``; a clamp is counted under ``reason`` and logged
    (once per reason per interval). ``what`` names the position for the log."""
    if claimed <= limit:
        return claimed
    relay.metrics.positions_clamped.labels(reason).inc()
    now, held = relay.refusals_logged.allow(reason)
    if now:
        more = f" ({held} more since the last line)" if held else ""
        log.warning("%s: seq %d clamped to %d (%s)%s", what, claimed, limit, reason, more)
    return limit
