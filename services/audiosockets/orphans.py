"""Child processes that end with their parent.

A service that starts processes of its own (``loadtest``'s publishers and
subscribers, ``process --workers N``) must not leave them running when it is
killed: a SIGKILL, an OOM kill or a crash gives it no chance to stop them, and
an orphan keeps sending audio, holding a handler's files or the caller's stderr.
Each child calls ``die_with_parent`` first thing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: ``prctl(2)`` option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when ``parent_pid`` (its parent) dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the documented OS interface, called
    through libc with ctypes (no maintained library wraps it). Chosen over a child
    watching its parent (``os.getppid()`` polls, or a thread waiting for EOF on a
    pipe) because the kernel delivers it whatever the child is doing: blocked in a
    read, busy in NumPy holding the GIL, or with its event loop wedged, and SIGKILL
    cannot be caught. Without it a killed ``loadtest`` left publishers running (and
    holding the parent's stderr, so a caller waiting for EOF hung). The signal
    comes when the *thread* that spawned us ends: spawn children from a thread
    that lives as long as the parent (``run_loadtest`` blocks in it; a processor's
    worker pool submits, and so spawns, from its event loop's thread).

    A parent that died before the call sends no signal: then ``os.getppid()`` is no
    longer ``parent_pid`` and we exit at once. Elsewhere (macOS, Windows) this only
    does that check; the parent's SIGTERM handling still stops the children.
    Raises ``OSError`` if ``prctl`` fails.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os._exit(1)  # orphaned already: nobody is left to read our figures
