"""The end-to-end scenario once more, with ``docker/compose.secure.yaml`` on.

The same services, faults and promises as tests/docker/test_compose_e2e.py
(scaling, a killed replica, a relay restart, a network cut, every seq archived
by the group and by the fan-out processor), with TLS on the relay's port,
client certificates required (mutual TLS) and per-role credentials. The site
directory is made by the commands README.md shows under "Hardening", run as
written (``sudo`` dropped when the test already is root). Before the scenario,
the relay must refuse what the override shuts out: plain TCP, and TLS without
a client certificate and token.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker_harness import HERE, ROOT, Compose, health, missing_seqs, poll
from test_compose_e2e import Evidence, run_scenario

from _support import require

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

FILES = [
    ROOT / "compose.yaml",
    HERE / "compose.e2e.yaml",
    ROOT / "docker" / "compose.secure.yaml",
    HERE / "compose.e2e-secure.yaml",
]


def readme_site_commands() -> str:
    """The shell block of README.md's "Hardening" that makes the site directory."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Hardening", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", section, flags=re.S) if "certs init" in b]
    return block


def make_site(directory: Path) -> None:
    """Run the README's commands with ``site`` set to ``directory``."""
    audiosockets = shutil.which("audiosockets")
    require(audiosockets is not None, "the audiosockets command is not installed")
    script = readme_site_commands().replace("site=/etc/audiosockets/site\n", "")
    if os.geteuid() == 0:
        script = script.replace("sudo ", "")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "site": str(directory)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"README's site commands failed:\n{done.stdout}\n{done.stderr}"
    # Readable by the services' group, and the CA's key by nobody but its owner.
    for name in ("relay.key", "recorder.key", "processor.key", "admin.key", "admin.token"):
        assert (directory / name).stat().st_gid == 10001, name
        assert (directory / name).stat().st_mode & 0o077 == 0o040, name
    assert (directory / "ca.key").stat().st_mode & 0o077 == 0, "ca.key is readable by others"


def refused_status(compose: Compose, *unset: str, relay: str) -> subprocess.CompletedProcess[str]:
    """`audiosockets status` in the relay container without some of its credentials."""
    args = [arg for name in unset for arg in ("-u", name)]
    files = [arg for f in compose.files for arg in ("-f", str(f))]
    return subprocess.run(
        [compose.binary, "--project-directory", str(ROOT), *files, "exec", "-T", "relay",
         "env", *args, f"AUDIOSOCKETS_STATUS_RELAY={relay}", "audiosockets", "status"],
        cwd=ROOT, env=compose.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def secure_e2e(
    tmp_path_factory: pytest.TempPathFactory, service_images: str
) -> Iterator[tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]]]:
    workdir = tmp_path_factory.mktemp("compose-e2e-secure")
    for sub in ("group", "fanout"):
        (workdir / sub).mkdir()
        (workdir / sub).chmod(0o777)  # the services run as uid 10001
    site = workdir / "site"
    make_site(site)
    compose = Compose(
        f"audiosockets-e2e-secure-{os.getpid()}",
        FILES,
        {
            "E2E_DIR": str(workdir),
            "AUDIOSOCKETS_SECRETS": str(site),
            "AUDIOSOCKETS_IMAGE_TAG": service_images,
            "RELAY_PUBLISH": "127.0.0.1:",
        },
    )
    evidence = Evidence(workdir)
    refusals: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        compose.up(["relay"])
        relay = compose.containers("relay")[0]
        assert poll(lambda: health(relay) == "healthy", 90), compose.logs()
        identity = ("AUDIOSOCKETS_STATUS_TLS_CERT", "AUDIOSOCKETS_STATUS_TLS_KEY")
        token = ("AUDIOSOCKETS_STATUS_TOKEN_FILE",)
        refusals["plain tcp"] = refused_status(compose, relay="tcp://relay:7400")
        refusals["no certificate"] = refused_status(compose, *identity, relay="tls://relay:7400")
        refusals["no token"] = refused_status(compose, *token, relay="tls://relay:7400")
        run_scenario(compose, evidence)
        (workdir / "compose.log").write_text(compose.logs())
        yield evidence, refusals
    finally:
        compose.down()


def test_the_relay_refuses_what_the_override_shuts_out(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    _, refusals = secure_e2e
    for what, done in refusals.items():
        assert done.returncode != 0, f"{what}: status succeeded:\n{done.stdout}"
        assert done.stderr.strip(), f"{what}: no reason given"
    # A refusal by the relay's rules ends the client with status 1.
    assert refusals["no token"].returncode == 1, refusals["no token"].stderr


def test_every_stream_is_handled_by_exactly_one_replica(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    ev, _ = secure_e2e
    assert ev.owners_before_kill
    assert all(len(o) == 1 for o in ev.owners_before_kill.values()), ev.owners_before_kill


def test_faults_happened_and_were_survived(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    ev, _ = secure_e2e
    assert ev.victim_streams
    assert ev.group_members_after_kill >= 1
    assert ev.relay_uptime_after_restart < ev.relay_uptime_before_restart
    assert ev.outage_noticed_by_relay
    assert ev.exit_codes == dict.fromkeys(ev.exit_codes, 0)


def test_the_relay_dropped_nothing(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    ev, _ = secure_e2e
    assert ev.drops_before_restart == {}
    assert ev.drops_final == {}


def test_the_recorders_dropped_nothing(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    ev, _ = secure_e2e
    assert ev.recorder_drops
    assert ev.recorder_drops == dict.fromkeys(ev.recorder_drops, 0.0)


def test_both_archives_hold_every_seq(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    ev, _ = secure_e2e
    assert ev.fanout_caught_up
    assert ev.last_seq
    assert all(seq > 0 for seq in ev.last_seq.values())
    for stream, last in ev.last_seq.items():
        assert missing_seqs(ev.fanout_segments, stream, last) == [], stream
        assert missing_seqs(ev.group_segments, stream, last) == [], stream


def test_every_container_ran_locked_down(
    secure_e2e: tuple[Evidence, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    ev, _ = secure_e2e
    assert ev.lockdown
    for container, seen in ev.lockdown.items():
        assert seen["read_only"] is True, container
        assert seen["cap_drop"] == ["ALL"], container
        assert seen["uid"] == "10001", (container, seen)
        assert seen["writes"][:2] == ["/:Read-only_file_system", "/tmp:written"], container
