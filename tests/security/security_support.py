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
