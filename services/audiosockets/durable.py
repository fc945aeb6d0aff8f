"""Files that survive a power cut once written: fsync the data, rename, fsync the directory.

``os.replace`` makes a rewrite atomic for other processes, but until the file's
data and the directory entry are on the device a power cut or kernel crash can
leave an empty or torn file under the final name (ext4 and xfs both allow it).
Used where a file is finished once and must then hold: the archive's segments
and sidecars, the recorder's disk spool on a clean stop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s directory entries to the device (a best effort: a directory
    that cannot be opened, or a filesystem that refuses, is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file written earlier (and closed) to the device. Raises ``OSError``."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sync_file(f: BinaryIO) -> None:
    """Python's buffer, then the kernel's, to the device."""
    f.flush()
    os.fsync(f.fileno())


def write_durably(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` so that after a crash it holds the old or the
    new content, never a mix: written to ``tmp`` (default ``path`` + ``.tmp``),
    fsynced, renamed over ``path``, the directory fsynced. Raises ``OSError``."""
    tmp = tmp if tmp is not None else path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        sync_file(f)
    os.replace(tmp, path)
    fsync_dir(path.parent)


__all__ = ["fsync_dir", "fsync_path", "sync_file", "write_durably"]
