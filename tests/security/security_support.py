"""Helpers of the security tests: the test site's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from audiosockets.certs import Issued


@dataclass(frozen=True)
class Site:
    """A CA with relay and client certificates, and a stranger from another CA."""

    ca: Path
    relay: Issued
    client: Issued
    other_ca: Path
    stranger: Issued  # a client certificate from the other CA
    home: Path  # the site's directory (its CA can issue more)


#: Tokens of the test site's identities; the credentials file holds only their SHA-256.
TOKENS = {
    "rec-1": "rec-1-token",
    "rec-2": "rec-2-token",
    "archiver": "archiver-token",
    "listener": "listener-token",
    "ops": "ops-token",
    "loader": "loader-token",
}


def credentials_toml(**overrides: str) -> str:
    """The site's credentials file; ``overrides`` replace a client's whole table body."""
    import hashlib

    def digest(name: str) -> str:
        return hashlib.sha256(TOKENS[name].encode()).hexdigest()

    bodies = {
        "rec-1": 'roles = ["publish"]\nstreams = ["mic-*"]',
        "rec-2": 'roles = ["publish"]\nstreams = ["*"]',
        "archiver": 'roles = ["subscribe"]\nstreams = ["mic-*"]\ngroups = ["archivers"]',
        "listener": 'roles = ["subscribe"]\nstreams = ["mic-*"]',
        "ops": 'roles = ["admin"]',
        "loader": 'roles = ["publish", "subscribe"]\nstreams = ["load-*"]',
    }
    bodies.update(overrides)
    return "".join(
        f'[[client]]\nname = "{name}"\ntoken_sha256 = "{digest(name)}"\n{body}\n\n'
        for name, body in bodies.items()
    )


def write(path: Path, text: str) -> None:
    """Replace a file's text (out of the async tests' bodies: a blocking call)."""
    path.write_text(text)
