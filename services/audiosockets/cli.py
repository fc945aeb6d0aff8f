"""The ``audiosockets`` command line: one click group, one command per service.

Thin by design: each command parses flags (every flag is also an
``AUDIOSOCKETS_<COMMAND>_<OPTION>`` environment variable through click's
``auto_envvar_prefix``), builds its service's config, runs it, and maps our
errors to one line on stderr and a named exit code. No tracebacks for errors a
user can cause.
"""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"auto_envvar_prefix": "AUDIOSOCKETS", "show_default": True})
@click.version_option(__version__, prog_name="audiosockets")
def main() -> None:
    """Real-time audio over sockets: record, relay, process."""


# --- relay, status, loadtest (lead) -----------------------------------------

# --- record, devices (recorder) ---------------------------------------------

# --- process, demo (processor) ----------------------------------------------
