"""The container files, checked without an engine: hadolint, shellcheck, `docker-compose config`.

The compose checks read the file the way the engine will (`docker-compose
config` resolves .env, anchors and merges) and then assert what the user
relies on: scalable services carry no fixed name or host port, everything
waits for a healthy relay, restarts itself, and is configured through the
service's own ``AUDIOSOCKETS_*`` variables.
"""

from __future__ import annotations

import os
import re
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
RECORDERS = ("recorder", "recorder-pulse", "recorder-demo")
AUDIOSOCKETS_SERVICES = ("relay", *RECORDERS, *SCALABLE)
COMMAND_OF = (
    {"relay": "relay"} | dict.fromkeys(RECORDERS, "record") | {name: "process" for name in SCALABLE}
)


# Runs once before Grafana and exits: restarting it would be a loop.
ONE_SHOT = ("grafana-password",)


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
    for profile in ("mic", "pulse", "demo"):
        done = run([binary, "--profile", profile, "config", "--quiet"])
        assert done.returncode == 0, f"profile {profile}: {done.stderr}"
    assert set(run([binary, "config", "--profiles"]).stdout.split()) == {"mic", "pulse", "demo"}


def dotenv() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("#")}


def test_pulse_recorder_is_a_service_of_its_own_without_dev_snd() -> None:
    # An override of "recorder" would inherit devices: /dev/snd, and a host
    # without it cannot even create the container.
    services = compose_config(profile="pulse")["services"]
    pulse = services["recorder-pulse"]
    assert "devices" not in pulse
    assert "group_add" not in pulse
    assert pulse["build"]["target"] == "recorder-pulse"
    assert pulse["image"].startswith("audiosockets/recorder-pulse:")
    assert "recorder" in pulse["networks"]["default"]["aliases"]  # Prometheus' recorder job
    assert services["recorder"]["profiles"] == ["mic"]
    assert pulse["profiles"] == ["pulse"]


def test_pulse_recorder_runs_as_the_desktop_user_and_mounts_only_the_socket() -> None:
    env = dotenv()
    pulse = compose_config(profile="pulse")["services"]["recorder-pulse"]
    assert pulse["user"] == f"{env['PULSE_UID']}:{env['PULSE_GID']}"
    (mount,) = pulse["volumes"]  # the socket; no cookie, no runtime directory
    assert mount == {"type": "bind", "source": env["PULSE_SOCKET"], "target": "/run/pulse/native"}
    assert env["PULSE_SOCKET"].endswith("/pulse/native")


def test_no_host_path_is_mounted_with_the_short_syntax() -> None:
    # "HOST:CONTAINER" makes Docker create a root-owned directory at HOST when it
    # does not exist (a socket or a cookie path gone wrong under sudo); the long
    # syntax refuses to start instead. Paths inside the repository are fine.
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, service in raw["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":", 1)[0]
                assert source.startswith("./") or "/" not in source, f"{name}: {volume}"
            else:
                assert volume["type"] in ("bind", "volume"), f"{name}: {volume}"


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
        expected = "no" if name in ONE_SHOT else "unless-stopped"
        assert service.get("restart") == expected, name
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
    services = compose_config(profile="pulse")["services"]
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


def test_no_grafana_password_is_committed_and_grafana_waits_for_one() -> None:
    assert "GRAFANA_ADMIN_PASSWORD" not in dotenv()
    services = compose_config()["services"]  # valid without a password
    grafana = services["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    secret = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert any(
        v.endswith(f":{Path(secret).parent}:ro") and v.startswith("grafana-secret:")
        for v in grafana["volumes"]
    ), grafana["volumes"]
    assert grafana["depends_on"]["grafana-password"] == {
        "condition": "service_completed_successfully"
    }
    writer = services["grafana-password"]
    assert "grafana-secret:/data:rw" in writer["volumes"]


def load_grafana_password() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gp", ROOT / "docker" / "grafana_password.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grafana_password_is_generated_once_kept_or_taken_from_the_environment(
    tmp_path: Path,
) -> None:
    gp = load_grafana_password()
    path = tmp_path / "admin-password"
    said = gp.ensure_password(tmp_path, None)
    first = path.read_text().strip()
    assert len(first) >= 24
    assert path.stat().st_mode & 0o777 == 0o444  # Grafana's uid reads it
    assert said == f"Grafana admin password generated; read it with: {gp.READ_IT}"
    assert first not in said  # where it is, not what it is
    assert "kept" in gp.ensure_password(tmp_path, None)
    assert path.read_text().strip() == first  # a restart keeps it
    assert "taken from GRAFANA_ADMIN_PASSWORD" in gp.ensure_password(tmp_path, "chosen-one")
    assert path.read_text().strip() == "chosen-one"
    other = tmp_path / "other"
    other.mkdir()
    gp.ensure_password(other, None)
    assert (other / "admin-password").read_text().strip() != first  # random, not fixed


def test_published_ports_are_loopback_only() -> None:
    for name, service in compose_config(profile="pulse")["services"].items():
        for port in service.get("ports", []):
            text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port}"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_our_images_are_built_never_pulled_and_tagged_with_the_release() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dotenv()["AUDIOSOCKETS_IMAGE_TAG"] == version
    services = compose_config(profile="pulse")["services"]
    ours = {n: s for n, s in services.items() if s["image"].startswith("audiosockets/")}
    assert set(ours) >= {"relay", "recorder", "recorder-pulse", *SCALABLE}
    for name, service in ours.items():
        assert service.get("pull_policy") == "build", name
        assert service["image"].endswith(f":{version}"), name
        assert service["build"]["args"]["VERSION"] == version, name
    # The Kubernetes manifests deploy the same tag.
    release = (ROOT / "k8s" / "components" / "release" / "kustomization.yaml").read_text()
    assert f"newTag: {version}" in release or f'newTag: "{version}"' in release


def test_every_image_target_carries_oci_labels() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    by_name = {s.split()[2]: s for s in stages[1:] if len(s.split()) > 2 and s.split()[1] == "AS"}
    assert 'org.opencontainers.image.version="${VERSION}"' in by_name["runtime"]
    for target in ("relay", "recorder", "recorder-pulse", "processor"):
        assert "org.opencontainers.image.title=" in by_name[target], target
        assert "org.opencontainers.image.description=" in by_name[target], target


def pins(lock: Path) -> dict[str, Version]:
    return {name: version for name, (version, _) in hashed_pins(lock).items()}


def hashed_pins(lock: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (version, sha256 digests) from ``name==version \\`` + ``--hash=sha256:`` lines."""
    result: dict[str, tuple[Version, list[str]]] = {}
    name = ""
    for line in lock.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(" "):
            option, _, digest = line.strip().rstrip("\\").strip().partition("=sha256:")
            assert option == "--hash", f"{lock.name}: unexpected {line!r}"
            result[name][1].append(digest)
            continue
        pin = line.rstrip("\\").strip()
        raw, sep, version = pin.partition("==")
        assert sep, f"{lock.name}: not an exact pin: {line!r}"
        name = canonicalize_name(raw)
        result[name] = (Version(version), [])
    return result


@pytest.mark.parametrize("lock", ["requirements.lock", "build-requirements.lock"])
def test_every_pin_carries_the_hashes_pip_checks(lock: str) -> None:
    for name, (_, digests) in hashed_pins(ROOT / "docker" / lock).items():
        assert digests, f"docker/{lock}: {name} has no --hash (run docker/lock.sh)"
        assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests), name
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"--require-hashes -r {lock}" in dockerfile


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
