"""Who may do what at the relay: identities, roles, stream and group scopes.

Pure: no I/O beyond reading the credentials file, no asyncio. The relay asks
``Authenticator.authenticate(token, certificate)`` once per HELLO and the ``may_*``
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
      certificate = "rec-kitchen"       # and/or: the subject CN of its client certificate
      roles = ["publish"]               # any of publish, subscribe, admin
      streams = ["kitchen-*"]           # globs it may publish or subscribe to (default none)
      groups = ["archivers"]            # groups it may join (absent: none, fan-out only)

Tokens are matched by hashing the presented token and comparing it with every
entry's hash with ``hmac.compare_digest`` (all entries, so the time taken does
not say which entry came close).

A ``certificate`` entry is matched against the subject common name (CN) of the
client certificate the TLS handshake verified (``--tls-client-ca``; see
``certificate_name``), exactly and case-sensitively. The CN, not a subject
alternative name: ``audiosockets certs issue DIR NAME`` always makes NAME the
CN, while its DNS names are host names (``--dns``) that a client certificate
need not carry; and a certificate has one CN but may list many SANs, so one
certificate names at most one entry. An entry is identified by its
certificate, by its token, or by either when it names both; when a connection
brings both, they must name the same entry (``certificate_mismatch``).
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
    "certificate_unknown",  # a verified certificate no entry names, and no token
    "certificate_mismatch",  # a certificate naming one entry, a token not of that entry
]
REFUSAL_REASONS: tuple[RefusalReason, ...] = (
    "bad_token",
    "role_not_allowed",
    "stream_not_allowed",
    "group_not_allowed",
    "stream_owned",
    "certificate_required",
    "certificate_unknown",
    "certificate_mismatch",
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
    """Turns HELLO's token (and the verified client certificate) into an identity, or refuses it."""

    def authenticate(self, token: str, certificate: str | None = None) -> Identity | Refusal:
        """The identity ``token`` stands for, or the refusal. ``certificate``: the
        subject CN of the client certificate the TLS handshake verified (None:
        none); only ``Credentials`` use it."""
        ...


class OpenAccess:
    """No authentication: everyone is ``EVERYONE``."""

    def authenticate(self, token: str, certificate: str | None = None) -> Identity | Refusal:
        return EVERYONE


class SharedToken:
    """The relay's ``--token``: one secret, one identity with every role."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("the shared token must not be empty")
        self._digest = hashlib.sha256(token.encode()).digest()

    def authenticate(self, token: str, certificate: str | None = None) -> Identity | Refusal:
        presented = hashlib.sha256(token.encode()).digest()
        return EVERYONE if hmac.compare_digest(presented, self._digest) else BAD_TOKEN


@dataclass(frozen=True, slots=True)
class Client:
    """One ``[[client]]`` entry: the identity, the SHA-256 of its token and the
    name (CN) of its certificate; at least one of the two is not None."""

    identity: Identity
    token_sha256: bytes | None
    certificate: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """The clients of a credentials file (``load_credentials``); an ``Authenticator``."""

    clients: tuple[Client, ...]
    source: str = "<credentials>"

    def authenticate(self, token: str, certificate: str | None = None) -> Identity | Refusal:
        digest = hashlib.sha256(token.encode()).digest() if token else None
        return self.identify(digest, certificate)

    def identify(
        self, token_sha256: bytes | None, certificate: str | None = None
    ) -> Identity | Refusal:
        """The identity of a token's SHA-256 (None: no token) and a verified
        certificate's CN (None: no certificate); ``authenticate`` without the token.

        A certificate an entry names gives that entry, and a token sent with it
        must be that entry's (else ``certificate_mismatch``). Otherwise the token
        decides (``bad_token`` when it is unknown or missing); a certificate no
        entry names with no token at all is ``certificate_unknown``.
        """
        by_token = None if token_sha256 is None else self._by_token(token_sha256)
        by_certificate = None
        if certificate is not None:
            by_certificate = next((c for c in self.clients if c.certificate == certificate), None)
        if by_certificate is not None:
            if token_sha256 is None or by_token is by_certificate:
                return by_certificate.identity
            return Refusal(
                "certificate_mismatch",
                f"certificate and token disagree: the certificate is client "
                f"{by_certificate.identity.name!r}'s and the token is not",
            )
        if by_token is not None:
            return by_token.identity
        if token_sha256 is None and certificate is not None:
            return Refusal(
                "certificate_unknown",
                f"unknown certificate: no client of this relay has certificate "
                f"{certificate!r}, and no token was given",
            )
        return BAD_TOKEN

    def _by_token(self, token_sha256: bytes) -> Client | None:
        found: Client | None = None
        for client in self.clients:  # every entry with a token, whichever matches
            if client.token_sha256 is None:
                continue
            if hmac.compare_digest(token_sha256, client.token_sha256) and found is None:
                found = client
        return found

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

_FIELDS = frozenset({"name", "token_sha256", "certificate", "roles", "streams", "groups"})


def load_credentials(path: Path) -> Credentials:
    """Read and validate a credentials file (see the module docstring for its shape).

    Raises ConfigError with one line naming the file and the entry or line
    at fault: unreadable file, TOML syntax (with its line), a missing or
    unknown field, a role not in publish/subscribe/admin, a token hash that is
    not 64 hex digits, a certificate that is not a non-empty string, an entry
    with neither, a name, token hash or certificate used twice, no [[client]]
    at all (an empty or whitespace-only file).
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
    certificates: set[str] = set()
    for number, entry in enumerate(entries, 1):
        client = _parse_client(entry, f"{source}: [[client]] #{number}")
        name = client.identity.name
        if name in names:
            raise ConfigError(f"{source}: [[client]] #{number}: name {name!r} is used twice")
        if client.token_sha256 is not None and client.token_sha256 in digests:
            raise ConfigError(
                f"{source}: [[client]] #{number} ({name!r}): token_sha256 is used twice"
            )
        if client.certificate is not None and client.certificate in certificates:
            raise ConfigError(
                f"{source}: [[client]] #{number} ({name!r}): certificate "
                f"{client.certificate!r} is used twice"
            )
        names.add(name)
        if client.token_sha256 is not None:
            digests.add(client.token_sha256)
        if client.certificate is not None:
            certificates.add(client.certificate)
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
    if "token_sha256" not in entry and "certificate" not in entry:
        raise ConfigError(f"{where}: give 'token_sha256', 'certificate' or both")
    digest = entry.get("token_sha256")
    if digest is not None and (
        not isinstance(digest, str) or not _HEX_SHA256.fullmatch(digest.lower())
    ):
        raise ConfigError(
            f"{where}: 'token_sha256' must be the SHA-256 of the token as 64 hex digits "
            "(printf %s TOKEN | sha256sum)"
        )
    certificate = entry.get("certificate")
    if certificate is not None and (not isinstance(certificate, str) or not certificate.strip()):
        raise ConfigError(
            f"{where}: 'certificate' must be a non-empty string "
            "(the common name of the client's certificate)"
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
    return Client(identity, None if digest is None else bytes.fromhex(digest), certificate)


def _strings(entry: dict[str, Any], field: str, where: str, *, required: bool) -> list[str]:
    if field not in entry:
        if required:
            raise ConfigError(f"{where}: '{field}' is missing")
        return []
    value = entry[field]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: '{field}' must be a list of non-empty strings")
    return value
