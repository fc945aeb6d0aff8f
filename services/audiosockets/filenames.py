"""File names for stream names: one stream, one name, on any file system.

A stream name is any non-empty UTF-8 string (up to ``max_name_length`` bytes on the
wire, 200 by default): spaces, slashes, dots, accents, emoji. Files named after a
stream (archive segments, the recorder's spool directory) must not turn two streams
into one file, must not contain a path separator or NUL, and must fit the file
system's name limit (``NAME_MAX``: 255 bytes on ext4/xfs/btrfs/tmpfs, less on some,
e.g. eCryptfs).

``stream_stem(name, max_bytes)`` is the part of a file name that stands for the
stream. It is *injective*:

- A name made only of ``a-z 0-9 . _ -``, not starting with ``.`` and at most
  ``max_bytes`` long, is its own stem (``mic-1`` -> ``mic-1``), as in earlier
  versions, so existing archives keep their names.
- Any other name (upper case, a space, ``/``, non-ASCII, too long, a leading dot)
  becomes a readable prefix (every character outside ``A-Za-z0-9._-`` replaced by
  ``_``, cut to fit) then ``~`` and ``HASH_CHARS`` hex digits of the SHA-256 of the
  exact UTF-8 name: ``mic 1`` -> ``mic_1~…``, ``mic/1`` -> ``mic_1~…`` (another
  hash), while ``mic_1`` stays ``mic_1``.

Unchanged stems never contain ``~`` (and are lower case); changed stems always do,
so the two kinds never meet, and two changed stems meet only if 64 bits of SHA-256
collide. Names that differ only in case get different stems even when the file
system folds case (macOS, Windows): upper case always takes the hashed form, whose
hash is lower case. The mapping depends on nothing but the name and ``max_bytes``,
so it is the same in every process and on every host.

Readers that need the exact stream (the archive's continuity) store it inside the
file (the sidecar's ``stream``) and compare it, instead of trusting the name.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

#: Hex digits of SHA-256 appended to a changed name (64 bits).
HASH_CHARS = 16
#: Longest stem by default: leaves room for the suffixes file names add (time stamp,
#: seq, writer id, ``.part``) within 255 bytes.
STEM_MAX_BYTES = 80
#: Shortest budget a stem can be given: one readable character, ``~``, the hash.
STEM_MIN_BYTES = 1 + 1 + HASH_CHARS
#: ``NAME_MAX`` where the file system does not say (POSIX file systems in use: 255).
DEFAULT_NAME_MAX = 255

_UNCHANGED = re.compile(r"[a-z0-9_-][a-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def stream_stem(name: str, max_bytes: int = STEM_MAX_BYTES) -> str:
    """The file-name stem for stream ``name``: ASCII, at most ``max_bytes`` long.

    Injective over all strings (see the module note), never empty, never ``.`` or
    ``..``, never containing ``/``, ``\\`` or NUL. ``max_bytes`` must be at least
    ``STEM_MIN_BYTES`` (``ValueError`` otherwise).
    """
    if max_bytes < STEM_MIN_BYTES:
        raise ValueError(f"a stem needs at least {STEM_MIN_BYTES} bytes, got {max_bytes}")
    if _UNCHANGED.fullmatch(name) and len(name) <= max_bytes:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    prefix = _UNSAFE.sub("_", name)
    if prefix.startswith("."):
        prefix = "_" + prefix[1:]
    prefix = prefix[: max_bytes - 1 - HASH_CHARS] or "_"
    return f"{prefix}~{digest}"


def name_max(directory: Path) -> int:
    """The longest file name (bytes) ``directory``'s file system allows.

    From ``pathconf(PC_NAME_MAX)`` where the platform has it, else
    ``DEFAULT_NAME_MAX``.
    """
    try:
        value = os.pathconf(directory, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):  # no pathconf, unknown name, no dir
        return DEFAULT_NAME_MAX
    return value if value > 0 else DEFAULT_NAME_MAX


def stem_budget(directory: Path, reserved: int) -> int:
    """Bytes a stem may take in ``directory`` when names add ``reserved`` bytes around it.

    ``min(STEM_MAX_BYTES, NAME_MAX - reserved)``; ``ValueError`` with a sentence when
    the file system's limit leaves less than ``STEM_MIN_BYTES``.
    """
    limit = name_max(directory)
    budget = min(STEM_MAX_BYTES, limit - reserved)
    if budget < STEM_MIN_BYTES:
        raise ValueError(
            f"the file system of {directory} allows names of at most {limit} bytes; "
            f"at least {reserved + STEM_MIN_BYTES} are needed"
        )
    return budget


__all__ = [
    "DEFAULT_NAME_MAX",
    "HASH_CHARS",
    "STEM_MAX_BYTES",
    "STEM_MIN_BYTES",
    "name_max",
    "stem_budget",
    "stream_stem",
]
