"""The ``audiosockets`` command's entry point (and ``python -m audiosockets``).

It holds SIGHUP before anything slow is imported (``service.hold_hangups``):
importing the command line takes about a second on a busy edge PC, and a
hang-up in that second (a reload sent right after start, a terminal closing)
would end the process on the spot.
"""

from __future__ import annotations


def main() -> None:
    """Run the command line (``cli.main``), SIGHUP held until a service takes it."""
    from .service import hold_hangups

    hold_hangups()
    from .cli import main as command_line

    command_line(prog_name="audiosockets")
