"""Helpers of the security tests: the test site's files, and waiting for a refusal."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from audiosockets.certs import Issued
from audiosockets.client import Publisher, Subscriber
from audiosockets.errors import Refused


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


#: A credentials entry that only a client certificate identifies (CN ``rec-cert``:
#: the ``rec_cert`` fixture), no token.
CERT_ONLY = """
[[client]]
name = "rec-cert"
certificate = "rec-cert"
roles = ["publish"]
streams = ["mic-cert-*"]
"""


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


async def refused(client: Publisher | Subscriber) -> Refused:
    """Start ``client`` and wait for its refusal (it must come, and it must be final)."""
    await client.start()
    async with asyncio.timeout(10):
        await client.failed.wait()
    error = client.failure
    assert isinstance(error, Refused)
    assert error.exit_code == 1
    attempts = client.attempts
    await asyncio.sleep(0.3)  # pacing: a client that kept retrying would add attempts here
    assert client.attempts == attempts, "a refused client must not retry"
    await client.close()
    return error
