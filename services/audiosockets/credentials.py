"""Who may do what at the relay: identities, roles, stream and group scopes.

Pure: no I/O beyond reading the credentials file, no asyncio. The relay asks
``Authenticator.authenticate(token)`` once per HELLO and the ``may_*``
functions per request; each returns ``None`` (allowed) or a ``Refusal`` whose
``reason`` is the metric label and whose ``message`` is the sentence the
client prints before exiting with status 1.

Three modes, one interface:

* ``OpenAccess``: no authentication; every client is the anonymous identity
  with every role, stream and group.
* ``SharedToken``: the relay's ``--token``; the simplest mode: one secret, one
  identity, every role.
* ``Credentials``: the relay's ``--credentials FILE``, a TOML file of
  ``[[client]]`` tables::

      [[client]]
      name = "rec-kitchen"              # the identity; owns the streams it publishes
      token_sha256 = "9f86d0..."        # hex SHA-256 of the token (the file holds no secret)
      roles = ["publish"]               # any of publish, subscribe, admin
      streams = ["kitchen-*"]           # globs it may publish or subscribe to (default none)
      groups = ["archivers"]            # groups it may join (absent: none, fan-out only)

Tokens are matched by hashing the presented token and comparing it with every
entry's hash with ``hmac.compare_digest`` (all entries, so the time taken does
not say which entry came close).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Protocol

from .errors import ConfigError
from .protocol import Role as SessionRole

Permission = Literal["publish", "subscribe", "admin"]
PERMISSIONS: tuple[Permission, ...] = ("publish", "subscribe", "admin")

#: Why a request was refused: the ``reason`` label of ``audiosockets_refusals_total``.
RefusalReason = Literal[
    "bad_token",
    "role_not_allowed",
    "stream_not_allowed",
    "group_not_allowed",
    "stream_owned",  # a live stream another identity publishes
    "certificate_required",  # mutual TLS and the client sent no certificate
]
REFUSAL_REASONS: tuple[RefusalReason, ...] = (
    "bad_token",
    "role_not_allowed",
    "stream_not_allowed",
    "group_not_allowed",
    "stream_owned",
    "certificate_required",
)

#: The permission each session role needs in HELLO.
ROLE_PERMISSION: dict[SessionRole, Permission] = {
    SessionRole.PUBLISHER: "publish",
    SessionRole.SUBSCRIBER: "subscribe",
    SessionRole.OBSERVER: "admin",
}

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a session is and what it may do.

    ``name``: the identity (credentials ``name``; ``""`` for the anonymous or
    shared-token identity, whose streams then belong to the publisher's own
    name). ``roles``: permissions. ``streams``: globs of stream names it may
    publish or subscribe to. ``groups``: globs of groups it may join; ``None``
    means any.
    """

    name: str
    roles: frozenset[Permission]
    streams: tuple[str, ...]
    groups: tuple[str, ...] | None

    @property
    def anonymous(self) -> bool:
        """True for the open and shared-token modes (no per-client identity)."""
        return self.name == ""


EVERYONE = Identity("", frozenset(PERMISSIONS), ("*",), None)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused handshake or request: the metric ``reason`` and the client's sentence."""

    reason: RefusalReason
    message: str


BAD_TOKEN = Refusal("bad_token", "bad token: the relay does not know this token")


class Authenticator(Protocol):
    """Turns HELLO's token into an identity, or refuses it."""

    def authenticate(self, token: str) -> Identity | Refusal:
        """The identity ``token`` stands for, or ``BAD_TOKEN``."""
        ...


class OpenAccess:
    """No authentication: everyone is ``EVERYONE``."""

    def authenticate(self, token: str) -> Identity | Refusal:
        return EVERYONE


class SharedToken:
    """The relay's ``--token``: one secret, one identity with every role."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("the shared token must not be empty")
        self._digest = hashlib.sha256(token.encode()).digest()

    def authenticate(self, token: str) -> Identity | Refusal:
        presented = hashlib.sha256(token.encode()).digest()
        return EVERYONE if hmac.compare_digest(presented, self._digest) else BAD_TOKEN


@dataclass(frozen=True, slots=True)
class Client:
    """One ``[[client]]`` entry: the identity and the SHA-256 of its token."""

    identity: Identity
    token_sha256: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """The clients of a credentials file (``load_credentials``); an ``Authenticator``."""

    clients: tuple[Client, ...]
    source: str = "<credentials>"

    def authenticate(self, token: str) -> Identity | Refusal:
        if not token:
            return BAD_TOKEN
        return self.identify(hashlib.sha256(token.encode()).digest())

    def identify(self, token_sha256: bytes) -> Identity | Refusal:
        """The identity whose ``token_sha256`` this is (``authenticate`` without the token)."""
        found: Identity | None = None
        for client in self.clients:  # every entry, whichever matches
            if hmac.compare_digest(token_sha256, client.token_sha256) and found is None:
                found = client.identity
        return BAD_TOKEN if found is None else found

    def names(self) -> frozenset[str]:
        """Every identity name in the file."""
        return frozenset(c.identity.name for c in self.clients)


# -- decisions ------------------------------------------------------------------


def may_open(identity: Identity, role: SessionRole) -> Refusal | None:
    """May ``identity`` open a session in ``role`` (HELLO)? None: yes."""
    needed = ROLE_PERMISSION[role]
    if needed in identity.roles:
        return None
    return Refusal(
        "role_not_allowed",
        f"role not allowed: {_who(identity)} may not {_verb(needed)}",
    )


def may_publish(identity: Identity, stream: str) -> Refusal | None:
    """May ``identity`` publish ``stream`` (OPEN_STREAM)? None: yes."""
    if "publish" not in identity.roles:
        return Refusal("role_not_allowed", f"role not allowed: {_who(identity)} may not publish")
    if any(fnmatchcase(stream, glob) for glob in identity.streams):
        return None
    return Refusal(
        "stream_not_allowed",
        f"stream not allowed: {_who(identity)} may not publish {stream!r}",
    )


def may_subscribe(identity: Identity, pattern: str, group: str) -> Refusal | None:
    """May ``identity`` subscribe to ``pattern`` in ``group`` ("" = fan-out)? None: yes.

    Every stream name ``pattern`` can match must be one ``identity.streams``
    allows (``pattern_within``), so a subscription never needs filtering later.
    """
    if "subscribe" not in identity.roles:
        return Refusal("role_not_allowed", f"role not allowed: {_who(identity)} may not subscribe")
    if not pattern_within(pattern, identity.streams):
        allowed = ", ".join(identity.streams) or "none"
        return Refusal(
            "stream_not_allowed",
            f"stream not allowed: {_who(identity)} may not subscribe to {pattern!r} "
            f"(allowed: {allowed})",
        )
    if (
        group
        and identity.groups is not None
        and not any(fnmatchcase(group, glob) for glob in identity.groups)
    ):
        return Refusal(
            "group_not_allowed",
            f"group not allowed: {_who(identity)} may not join group {group!r}",
        )
    return None


def may_request_status(identity: Identity) -> Refusal | None:
    """May ``identity`` read the relay's status report (it names every stream)? None: yes."""
    if "admin" in identity.roles:
        return None
    return Refusal(
        "role_not_allowed", f"role not allowed: {_who(identity)} may not read the status"
    )


def may_take_over(owner: str, claimant: str, stream: str) -> Refusal | None:
    """May ``claimant`` publish ``stream``, which ``owner`` opened? None: yes.

    Owners are identity names (or, without per-client credentials, the
    publisher's instance). A stream belongs to its first publisher for as long
    as the relay holds it.
    """
    if owner == claimant:
        return None
    return Refusal(
        "stream_owned",
        f"stream not allowed: {stream!r} belongs to another publisher ({owner})",
    )


def pattern_within(pattern: str, globs: tuple[str, ...]) -> bool:
    """True when every name ``pattern`` matches is matched by one of ``globs``.

    Decided conservatively (``fnmatch`` syntax: ``*``, ``?``, ``[...]``): a
    pattern without wildcards is checked as a name; otherwise it must equal a
    glob, or a glob must be ``*``, or a glob ``PREFIX*`` (PREFIX without
    wildcards) must prefix the pattern's literal start. A pattern that is
    covered only by a union of globs is refused (False): ask for each part.
    """
    if not _WILDCARDS & set(pattern):
        return any(fnmatchcase(pattern, glob) for glob in globs)
    literal = _literal_prefix(pattern)
    for glob in globs:
        if glob in ("*", pattern):
            return True
        head = glob[:-1]
        if glob.endswith("*") and not _WILDCARDS & set(head) and literal.startswith(head):
            return True
    return False


def _literal_prefix(pattern: str) -> str:
    for i, char in enumerate(pattern):
        if char in _WILDCARDS:
            return pattern[:i]
    return pattern


def _who(identity: Identity) -> str:
    return f"client {identity.name!r}" if identity.name else "this client"


def _verb(permission: Permission) -> str:
    return {"publish": "publish", "subscribe": "subscribe", "admin": "read the status"}[permission]


# -- the file -------------------------------------------------------------------

_FIELDS = frozenset({"name", "token_sha256", "roles", "streams", "groups"})


def load_credentials(path: Path) -> Credentials:
    """Read and validate a credentials file (see the module docstring for its shape).

    Raises ConfigError with one line naming the file and the entry or line
    at fault: unreadable file, TOML syntax (with its line), a missing or
    unknown field, a role not in publish/subscribe/admin, a token hash that is
    not 64 hex digits, a name or token hash used twice, no [[client]] at all
    (an empty or whitespace-only file).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read credentials file {path}: {reason}") from exc
    return parse_credentials(text, source=str(path))


def parse_credentials(text: str, *, source: str = "<credentials>") -> Credentials:
    """Parse the TOML text of a credentials file; errors as ``load_credentials``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(document) - {"client"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key {sorted(unknown)[0]!r} (only [[client]])"
        )
    entries = document.get("client", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: 'client' must be [[client]] tables")
    if not entries:
        # An empty file is more likely truncated mid-edit than meant to lock everyone out.
        raise ConfigError(f"{source}: no [[client]] tables: the file admits no one")
    clients: list[Client] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, entry in enumerate(entries, 1):
        client = _parse_client(entry, f"{source}: [[client]] #{number}")
        name = client.identity.name
        if name in names:
            raise ConfigError(f"{source}: [[client]] #{number}: name {name!r} is used twice")
        if client.token_sha256 in digests:
            raise ConfigError(
                f"{source}: [[client]] #{number} ({name!r}): token_sha256 is used twice"
            )
        names.add(name)
        digests.add(client.token_sha256)
        clients.append(client)
    return Credentials(tuple(clients), source)


def _parse_client(entry: dict[str, Any], where: str) -> Client:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name!r})"
    digest = entry.get("token_sha256")
    if not isinstance(digest, str) or not _HEX_SHA256.fullmatch(digest.lower()):
        raise ConfigError(
            f"{where}: 'token_sha256' must be the SHA-256 of the token as 64 hex digits "
            "(printf %s TOKEN | sha256sum)"
        )
    roles = _strings(entry, "roles", where, required=True)
    for role in roles:
        if role not in PERMISSIONS:
            raise ConfigError(f"{where}: role {role!r} is not one of {', '.join(PERMISSIONS)}")
    streams = _strings(entry, "streams", where, required=False)
    groups = _strings(entry, "groups", where, required=False)
    identity = Identity(
        name,
        frozenset(r for r in PERMISSIONS if r in roles),
        tuple(streams),
        tuple(groups),
    )
    return Client(identity, bytes.fromhex(digest))


def _strings(entry: dict[str, Any], field: str, where: str, *, required: bool) -> list[str]:
    if field not in entry:
        if required:
            raise ConfigError(f"{where}: '{field}' is missing")
        return []
    value = entry[field]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: '{field}' must be a list of non-empty strings")
    return value
