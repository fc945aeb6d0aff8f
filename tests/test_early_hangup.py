"""A SIGHUP while the command line is still starting (about a second of imports
on a busy machine) is held for the service, never its end: the relay reloads
and keeps running, a recorder stops cleanly (exit 0).

The hang-up is delivered deterministically in that window: an import hook
signals the process as ``audiosockets.cli`` starts to import, then the real
entry point (``audiosockets.entry.main``) runs the command.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from _support import free_port

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")

#: ``python -c`` program: the ``audiosockets`` command, hung up while it imports.
HUNG_UP_WHILE_IMPORTING = """
import os, signal, sys

class HangUpOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "audiosockets.cli":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGHUP)
        return None

sys.meta_path.insert(0, HangUpOnImport())
sys.argv = ["audiosockets", *sys.argv[1:]]
from audiosockets.entry import main
main()
"""


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", HUNG_UP_WHILE_IMPORTING, *args]


def test_a_relay_hung_up_while_it_starts_reloads_and_keeps_running() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    relay = subprocess.Popen(
        command("relay", "--listen", url, "--metrics-port", "0"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stderr is not None
        seen = [relay.stderr.readline() for _ in range(2)]  # the hang-up and the socket
        assert any(line.startswith("relay listening on") for line in seen), seen
        # Held, then handled as any SIGHUP: a reload (here: nothing to reload).
        assert any("SIGHUP: nothing to reload" in line for line in seen), seen
        status = subprocess.run(
            [sys.executable, "-m", "audiosockets", "status", "--relay", url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0, status.stderr
        assert relay.poll() is None
    finally:
        relay.terminate()
        _, err = relay.communicate(timeout=30)
    assert relay.returncode == 0, err


def test_a_recorder_hung_up_while_it_starts_stops_cleanly() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"  # no relay: it would retry until stopped
    record = subprocess.Popen(
        command("record", "--relay", url, "--stream", "mic", "--source", "synth:sine",
                "--metrics-port", "0", "--flush-seconds", "0.5"),
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        _, err = record.communicate(timeout=60)
    finally:
        if record.poll() is None:
            record.kill()
            record.wait(10)
    assert record.returncode == 0, err
    assert "stop requested by signal" in err, err
