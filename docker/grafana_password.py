"""Grafana's admin password for compose.yaml: given, or generated once; never committed.

Runs once before Grafana (service ``grafana-password``, as uid 10001 in the processor
image) and writes the password to ``DIR/admin-password`` (default ``/data``, the
named volume ``grafana-secret``), which Grafana reads through
``GF_SECURITY_ADMIN_PASSWORD__FILE``:

- ``GRAFANA_ADMIN_PASSWORD`` set (shell or ``.env``): that password;
- else a file already there: kept (the password of the first start);
- else 24 random URL-safe characters from ``secrets``.

It prints where to read it, not the password. Grafana applies it only when it
creates its database (first start); afterwards change it in Grafana, or with
``grafana cli admin reset-admin-password``. Standard library only.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

READ_IT = "docker compose exec grafana cat /run/secrets/grafana/admin-password"


def ensure_password(directory: Path, given: str | None) -> str:
    """Write or keep the password in ``directory``; return what was done, as a sentence."""
    path = directory / "admin-password"
    if given:
        source = "taken from GRAFANA_ADMIN_PASSWORD"
        password = given
    elif path.is_file() and path.read_text().strip():
        return f"Grafana admin password kept from the first start; read it with: {READ_IT}"
    else:
        source = "generated"
        password = secrets.token_urlsafe(18)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(password + "\n")
    tmp.chmod(0o444)  # Grafana reads it as its own uid (472)
    tmp.replace(path)
    return f"Grafana admin password {source}; read it with: {READ_IT}"


def main(argv: list[str]) -> int:
    directory = Path(argv[0]) if argv else Path("/data")
    try:
        print(ensure_password(directory, os.environ.get("GRAFANA_ADMIN_PASSWORD")), flush=True)
    except OSError as exc:
        print(f"grafana_password: cannot write to {directory}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
