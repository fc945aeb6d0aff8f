"""The container files, checked without an engine: hadolint, shellcheck, `docker-compose config`.

The compose checks read the file the way the engine will (`docker-compose
config` resolves .env, anchors and merges) and then assert what the user
relies on: scalable services carry no fixed name or host port, everything
waits for a healthy relay, restarts itself, and is configured through the
service's own ``AUDIOSOCKETS_*`` variables.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from _support import require_binary
from audiosockets.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SCALABLE = ("processor", "processor-vad", "processor-archive")
AUDIOSOCKETS_SERVICES = ("relay", "recorder", "recorder-demo", *SCALABLE)
COMMAND_OF = {"relay": "relay", "recorder": "record", "recorder-demo": "record"} | {
    name: "process" for name in SCALABLE
}


def dockerfiles() -> list[Path]:
    return sorted(p for p in (ROOT / "docker").rglob("Dockerfile*") if "wheels" not in p.parts)


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


def compose_config(*extra_files: str, profile: str | None = None) -> dict[str, Any]:
    binary = require_binary("docker-compose")
    files = [arg for f in ("compose.yaml", *extra_files) for arg in ("-f", f)]
    args = [binary, *files, *(["--profile", profile] if profile else []), "config"]
    done = run(args)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_there_is_a_dockerfile() -> None:
    assert dockerfiles(), "docker/Dockerfile is missing"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = require_binary("hadolint")
    done = run([hadolint, "--no-color", str(dockerfile)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # Guards the test above against a hadolint that passes everything.
    hadolint = require_binary("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    assert run([hadolint, "--no-color", str(bad)]).returncode != 0


def shell_scripts() -> list[Path]:
    return sorted([*(ROOT / "tests" / "docker").glob("*.sh"), *(ROOT / "docker").glob("*.sh")])


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.name)
def test_shellcheck_passes(script: Path) -> None:
    shellcheck = require_binary("shellcheck")
    done = run([shellcheck, str(script)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_is_valid_for_every_profile() -> None:
    binary = require_binary("docker-compose")
    for profile in ("mic", "demo"):
        done = run([binary, "--profile", profile, "config", "--quiet"])
        assert done.returncode == 0, f"profile {profile}: {done.stderr}"
    assert set(run([binary, "config", "--profiles"]).stdout.split()) == {"mic", "demo"}


def test_pulse_override_is_valid_and_builds_the_pulse_recorder() -> None:
    recorder = compose_config("docker/compose.pulse.yaml")["services"]["recorder"]
    assert recorder["build"]["args"]["RECORDER_PULSE"] == "1"
    assert recorder["environment"]["PULSE_SERVER"] == "unix:/run/pulse/native"
    assert any(v.endswith(":/run/pulse/native:rw") for v in recorder["volumes"])


def test_scalable_services_have_no_fixed_name_or_host_port() -> None:
    services = compose_config()["services"]
    for name in SCALABLE:
        assert "container_name" not in services[name], name
        assert "ports" not in services[name], name


def test_scaled_replicas_share_work_through_one_group_per_service() -> None:
    services = compose_config()["services"]
    groups = [services[name]["environment"]["AUDIOSOCKETS_PROCESS_GROUP"] for name in SCALABLE]
    assert all(groups)
    assert len(set(groups)) == len(groups), "two processor services would split one group"


def test_every_service_restarts_and_the_pipeline_waits_for_a_healthy_relay() -> None:
    services = compose_config()["services"]
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
    for name in AUDIOSOCKETS_SERVICES:
        if name == "relay":
            continue
        assert services[name]["depends_on"] == {"relay": {"condition": "service_healthy"}}, name
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_environment_names_are_options_the_cli_reads() -> None:
    # A misspelt AUDIOSOCKETS_* variable is silently ignored by click: the
    # compose file must only set variables some option actually reads.
    known = {"AUDIOSOCKETS_LOG_LEVEL"}
    for command in cli_main.commands.values():
        known |= {p.envvar for p in command.params if isinstance(p.envvar, str)}
    services = compose_config("docker/compose.pulse.yaml")["services"]
    for name in AUDIOSOCKETS_SERVICES:
        env = services[name]["environment"]
        ours = {k for k in env if k.startswith("AUDIOSOCKETS_")}
        assert ours <= known, f"{name}: unknown {sorted(ours - known)}"
        prefix = f"AUDIOSOCKETS_{COMMAND_OF[name].upper()}_"
        assert all(k.startswith(prefix) or k == "AUDIOSOCKETS_LOG_LEVEL" for k in ours), name


def test_demo_profile_swaps_the_microphone_for_a_synthetic_source() -> None:
    services = compose_config(profile="demo")["services"]
    demo = services["recorder-demo"]
    assert demo["environment"]["AUDIOSOCKETS_RECORD_SOURCE"].startswith("synth:")
    assert "devices" not in demo
    # Prometheus finds recorders by the DNS name "recorder".
    assert "recorder" in demo["networks"]["default"]["aliases"]
    assert services["recorder"]["devices"] == ["/dev/snd:/dev/snd"]


def test_monitoring_is_provisioned_from_the_repository() -> None:
    services = compose_config()["services"]
    mounts = {
        v.split(":")[1]: Path(v.split(":")[0])
        for v in services["grafana"]["volumes"] + services["prometheus"]["volumes"]
        if v.startswith("/")
    }
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    assert (mounts["/etc/grafana/provisioning"] / "datasources").is_dir()
    assert list(mounts["/var/lib/grafana/dashboards/audiosockets"].glob("*.json"))
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]


def test_grafana_password_is_required() -> None:
    binary = require_binary("docker-compose")
    done = run([binary, "config", "--quiet"], GRAFANA_ADMIN_PASSWORD="")
    assert done.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in done.stderr


def pins(lock: Path) -> dict[str, Version]:
    result: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"{lock.name}: not an exact pin: {line!r}"
            result[canonicalize_name(name)] = Version(version)
    return result


@pytest.mark.parametrize(
    ("lock", "keys"),
    [
        ("requirements.lock", [("project", "dependencies"), ("speed",)]),
        ("build-requirements.lock", [("build-system", "requires")]),
    ],
)
def test_lock_pins_every_declared_dependency(lock: str, keys: list[tuple[str, ...]]) -> None:
    # The images install from the lock alone (pip --no-deps for the package):
    # a dependency added to pyproject.toml without `docker/lock.sh` would be
    # missing at run time in the container only.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared: list[str] = []
    for key in keys:
        if key == ("speed",):
            declared += project["project"]["optional-dependencies"]["speed"]
        else:
            declared += project[key[0]][key[1]]
    pinned = pins(ROOT / "docker" / lock)
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in docker/{lock}: run docker/lock.sh"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"docker/{lock} pins {req.name}=={pinned[name]}, outside {req.specifier}"
        )
