"""Names and tokens the protocol carries, checked where a flag sets them.

Every ``str`` field of a frame that names something (client, stream, pattern,
group) or carries the token is at most ``Limits.max_name_length`` bytes of UTF-8
(200 by default, PROTOCOL.md "Frames"). A longer one is refused by the relay on
every attempt, so a service that only found out from the relay would reconnect
forever; these checks turn it into a ``ConfigError`` (exit status 2) at start.
"""

from __future__ import annotations

from .errors import ConfigError
from .protocol import Limits

#: Bytes of UTF-8 in one protocol name or token (``Limits.max_name_length``).
MAX_NAME_BYTES = Limits().max_name_length


def name_problem(
    flag: str, value: str | None, *, optional: bool = False, limit: int = MAX_NAME_BYTES
) -> str | None:
    """Why ``value`` cannot be sent as ``flag`` (one sentence), or None when it can.

    ``optional``: None or "" means "not set" and is fine (a token, a client name
    the service derives itself); otherwise a name must have 1 to ``limit`` bytes.
    """
    if not value:
        return None if optional else f"{flag} must not be empty"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        return f"{flag} is {size} bytes of UTF-8; the protocol carries at most {limit}"
    return None


def check_name(
    flag: str, value: str | None, *, optional: bool = False, limit: int = MAX_NAME_BYTES
) -> None:
    """``name_problem`` as an exception: ``ConfigError`` naming ``flag``."""
    problem = name_problem(flag, value, optional=optional, limit=limit)
    if problem is not None:
        raise ConfigError(problem)


def fit_name(prefix: str, middle: str, suffix: str, *, limit: int = MAX_NAME_BYTES) -> str:
    """``prefix + middle + suffix`` cut to ``limit`` bytes of UTF-8 by shortening
    ``middle`` from its start (its end, e.g. a handler's file and function, says
    the most), then ``suffix`` if it alone is too long. For names a service
    derives itself, which must never be what makes the relay refuse it."""
    whole = prefix + middle + suffix
    if len(whole.encode()) <= limit:
        return whole
    room = limit - len((prefix + "…" + suffix).encode())
    if room > 0:
        tail = middle.encode()[-room:].decode("utf-8", "ignore")
        return prefix + "…" + tail + suffix
    return (prefix + suffix).encode()[:limit].decode("utf-8", "ignore")
