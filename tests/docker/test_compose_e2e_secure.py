"""The compose end-to-end scenario once more, with docker/compose.secure.yaml on:
TLS and mutual TLS on the relay, per-client credentials, read-only, capability-less,
non-root containers. The same promises hold (the tests are test_compose_e2e's,
run against this module's ``e2e`` evidence), and the relay refuses what it must.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker_harness import HERE, ROOT, Compose
from test_compose_e2e import (
    Evidence,
    run_scenario,
    test_a_killed_replicas_streams_move_to_a_survivor,
    test_every_stream_is_handled_by_exactly_one_replica,
    test_fanout_archive_holds_every_seq_without_gaps,
    test_fanout_processor_got_every_chunk_once_in_order,
    test_group_archive_holds_every_seq_across_the_handover,
    test_nothing_was_dropped,
    test_services_exit_cleanly_on_sigterm,
    test_the_relay_really_restarted_and_the_outage_was_noticed,
)

from audiosockets.certs import init_site, issue

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

__all__ = [  # the scenario's promises, collected here against the secure evidence
    "test_a_killed_replicas_streams_move_to_a_survivor",
    "test_every_stream_is_handled_by_exactly_one_replica",
    "test_fanout_archive_holds_every_seq_without_gaps",
    "test_fanout_processor_got_every_chunk_once_in_order",
    "test_group_archive_holds_every_seq_across_the_handover",
    "test_nothing_was_dropped",
    "test_services_exit_cleanly_on_sigterm",
    "test_the_relay_really_restarted_and_the_outage_was_noticed",
]

TOKENS = {
    "recorder": "recorder-e2e-token",
    "processor": "processor-e2e-token",
    "admin": "admin-e2e-token",
}
ROLES = {
    "recorder": 'roles = ["publish"]\nstreams = ["*"]',
    "processor": 'roles = ["subscribe"]\nstreams = ["*"]\ngroups = ["archive", "level", "vad"]',
    "admin": 'roles = ["admin"]',
}


def make_site(directory: Path) -> Path:
    """The secrets directory docker/compose.secure.yaml mounts, made with the certs module."""
    pki = directory / "pki"
    init_site(pki)
    relay = issue(pki, "relay", dns=["relay", "localhost"], ips=["127.0.0.1"])
    client = issue(pki, "client")
    secrets = directory / "secrets"
    secrets.mkdir()
    files = {
        "ca.pem": (pki / "ca.pem").read_bytes(),
        "relay.pem": relay.cert.read_bytes(),
        "relay.key": relay.key.read_bytes(),
        "client.pem": client.cert.read_bytes(),
        "client.key": client.key.read_bytes(),
        "credentials.toml": "".join(
            f'[[client]]\nname = "{name}"\n'
            f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n{ROLES[name]}\n\n'
            for name, token in TOKENS.items()
        ).encode(),
        **{f"{name}.token": f"{token}\n".encode() for name, token in TOKENS.items()},
    }
    for name, data in files.items():
        path = secrets / name
        path.write_bytes(data)
        # The services run as uid 10001 and read these files through a bind mount.
        if os.geteuid() == 0:
            os.chown(path, 10001, 10001)
            path.chmod(0o600)
        else:
            path.chmod(0o644)  # a test's throwaway site; a real one is chowned
    return secrets


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, service_images: str) -> Iterator[Evidence]:
    workdir = tmp_path_factory.mktemp("compose-e2e-secure")
    for sub in ("group", "fanout"):
        (workdir / sub).mkdir()
        (workdir / sub).chmod(0o777)  # the services run as uid 10001
    secrets = make_site(workdir)
    compose = Compose(
        f"audiosockets-e2e-secure-{os.getpid()}",
        [
            ROOT / "compose.yaml",
            HERE / "compose.e2e.yaml",
            ROOT / "docker" / "compose.secure.yaml",
            HERE / "compose.e2e.secure.yaml",
        ],
        {
            "E2E_DIR": str(workdir),
            "AUDIOSOCKETS_IMAGE_TAG": service_images,
            "RELAY_PUBLISH": "127.0.0.1:",
            "AUDIOSOCKETS_SECRETS": str(secrets),
        },
    )
    evidence = Evidence(workdir)
    try:
        run_scenario(compose, evidence)
        (workdir / "compose.log").write_text(compose.logs())
        yield evidence
    finally:
        compose.down()
