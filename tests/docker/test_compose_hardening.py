"""Every compose service locked down, checked without an engine (`docker-compose config`).

What the engine will run is what ``docker-compose config`` prints after
resolving .env, anchors, profiles and override files; each test reads that:

- every service, in every profile and with every override this repository
  ships (the end-to-end tests' and ``docker/compose.secure.yaml``), has a
  read-only root filesystem, drops every capability and adds none, sets
  ``no-new-privileges``, is not privileged, and runs as a non-root user (its
  own ``user:``, or the ``USER`` of the Dockerfile target it is built from);
- what a service writes (the archive directory, a spool directory, /tmp) is a
  volume or a tmpfs, so the read-only root never breaks a write at run time;
- the microphone recorder still gets /dev/snd and the audio group, without
  privilege or any capability.

tests/docker/test_compose_e2e.py runs the hardened services on the engine.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from _support import require_binary
from audiosockets.cli import main as cli_main
from audiosockets.processor import parse_spec

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PROFILES = ("mic", "pulse", "demo")
# Overrides and what they need to render (paths only: nothing is read).
OVERRIDES = {
    "e2e": (HERE / "compose.e2e.yaml", {"E2E_DIR": "/nonexistent"}),
    "passthrough": (HERE / "compose.passthrough.yaml", {"E2E_DIR": "/nonexistent"}),
    "secure": (ROOT / "docker" / "compose.secure.yaml", {"AUDIOSOCKETS_SECRETS": "/nonexistent"}),
}
# The secure end-to-end run: four files.
SECURE_E2E = (
    HERE / "compose.e2e.yaml",
    ROOT / "docker" / "compose.secure.yaml",
    HERE / "compose.e2e-secure.yaml",
)
NO_NEW_PRIVILEGES = {"no-new-privileges:true", "no-new-privileges=true", "no-new-privileges"}

Service = dict[str, Any]


def compose_services(*files: Path, profile: str, **env: str) -> dict[str, Service]:
    """``docker-compose config`` of compose.yaml plus ``files`` under ``profile``."""
    binary = require_binary("docker-compose")
    args = [binary, "-f", str(ROOT / "compose.yaml")]
    for file in files:
        args += ["-f", str(file)]
    done = subprocess.run(
        [*args, "--profile", profile, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, f"{args}: {done.stderr}"
    services: dict[str, Service] = yaml.safe_load(done.stdout)["services"]
    return services


def configurations() -> list[tuple[str, dict[str, Service]]]:
    """(label, services) for every profile alone and with every override."""
    result = []
    for profile in PROFILES:
        result.append((profile, compose_services(profile=profile)))
        for name, (file, env) in OVERRIDES.items():
            result.append((f"{profile}+{name}", compose_services(file, profile=profile, **env)))
        env = {"E2E_DIR": "/nonexistent", "AUDIOSOCKETS_SECRETS": "/nonexistent"}
        result.append(
            (f"{profile}+e2e+secure", compose_services(*SECURE_E2E, profile=profile, **env))
        )
    return result


@pytest.fixture(scope="module")
def rendered() -> list[tuple[str, dict[str, Service]]]:
    return configurations()


def dockerfile_users() -> dict[str, str]:
    """Build target -> the last USER in force at its end (inherited from its FROM)."""
    users: dict[str, str] = {}
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stage = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, flags=re.I)
        if stage:
            parent, current = stage.groups()
            users[current] = users.get(parent, "")
        user = re.match(r"USER\s+(\S+)", line, flags=re.I)
        if user and current:
            users[current] = user[1]
    return users


def effective_user(service: Service) -> str:
    """``user:``, else the USER of the Dockerfile target its image is (built from)."""
    if "user" in service:
        return str(service["user"])
    target = service.get("build", {}).get("target")
    image = str(service.get("image", ""))
    if not target and image.startswith("audiosockets/"):
        target = image.removeprefix("audiosockets/").split(":", 1)[0]  # compose.yaml's tags
    if target not in dockerfile_users():
        raise ValueError(f"image {image!r} has no `user:` and is no target of {DOCKERFILE.name}")
    return dockerfile_users()[target]


def is_root(user: str) -> bool:
    uid, _, gid = user.partition(":")
    return uid in ("", "0", "root") or gid in ("0", "root")


def lockdown_problems(service: Service) -> list[str]:
    """What is missing from the lockdown of one rendered service (empty: none)."""
    problems = []
    if service.get("read_only") is not True:
        problems.append("root filesystem not read-only (read_only: true)")
    if service.get("cap_drop") != ["ALL"]:
        problems.append(f"cap_drop is {service.get('cap_drop')}, not [ALL]")
    if service.get("cap_add"):
        problems.append(f"adds capabilities {service['cap_add']}")
    if not NO_NEW_PRIVILEGES & set(service.get("security_opt", [])):
        problems.append("no security_opt no-new-privileges:true")
    if service.get("privileged"):
        problems.append("privileged")
    try:
        user = effective_user(service)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if is_root(user):
            problems.append(f"runs as {user or 'root (no USER)'}")
    return problems


def writable_mounts(service: Service) -> set[str]:
    """Container paths a service may write: tmpfs and read-write volumes."""
    paths = set()
    for entry in service.get("tmpfs", []):
        paths.add(str(entry).split(":", 1)[0])
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2 and "ro" not in parts[2:]:
                paths.add(parts[1])
        elif not volume.get("read_only"):
            paths.add(volume["target"])
    return paths


def written_paths(service: Service) -> list[str]:
    """Directories the service writes to, by its configuration."""
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    paths = ["/tmp", env.get("AUDIOSOCKETS_RECORD_SPOOL_DIR", "")]
    handler = env.get("AUDIOSOCKETS_PROCESS_HANDLER")
    if handler and parse_spec(handler).target == "archive":
        paths.append(parse_spec(handler).arg or "")
    events = env.get("AUDIOSOCKETS_PROCESS_EVENTS", "")
    paths.append(str(Path(events).parent) if events else "")
    cookie = env.get("PULSE_COOKIE", "")
    paths.append(str(Path(cookie).parent) if cookie else "")
    return [p for p in paths if p]


def test_every_override_exists() -> None:
    for file in (*(f for f, _ in OVERRIDES.values()), *SECURE_E2E):
        assert file.is_file(), file


def test_every_service_is_locked_down_in_every_profile_and_override(
    rendered: list[tuple[str, dict[str, Service]]],
) -> None:
    problems = [
        f"{label}: {name}: {problem}"
        for label, services in rendered
        for name, service in services.items()
        for problem in lockdown_problems(service)
    ]
    assert not problems, "\n".join(problems)


def test_the_lockdown_check_catches_each_missing_protection(
    rendered: list[tuple[str, dict[str, Service]]],
) -> None:
    # Guards the test above against a check that passes everything.
    relay = rendered[0][1]["relay"]
    assert lockdown_problems(relay) == []
    for key, bad in (
        ("read_only", False),
        ("cap_drop", ["NET_RAW"]),
        ("cap_add", ["SYS_ADMIN"]),
        ("security_opt", []),
        ("privileged", True),
        ("user", "0:0"),
        ("user", "10001:0"),
    ):
        assert lockdown_problems({**relay, key: bad}), f"{key}: {bad} passed"
    assert lockdown_problems({**relay, "build": {"target": "base"}})  # no USER: root
    assert lockdown_problems({k: v for k, v in relay.items() if k not in ("build", "image")})


def test_our_images_end_as_the_unprivileged_user() -> None:
    users = dockerfile_users()
    for target in ("relay", "recorder", "recorder-pulse", "processor"):
        assert users[target] == "10001:10001", target


def test_what_a_service_writes_is_a_volume_or_a_tmpfs(
    rendered: list[tuple[str, dict[str, Service]]],
) -> None:
    for label, services in rendered:
        for name, service in services.items():
            if service.get("image", "").startswith(("prom/", "grafana/")):
                continue  # not ours: their data directories are volumes (below)
            mounts = writable_mounts(service)
            for path in written_paths(service):
                covered = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
                assert covered, f"{label}: {name} writes {path}, which is no volume or tmpfs"


def test_prometheus_and_grafana_keep_their_data_on_volumes(
    rendered: list[tuple[str, dict[str, Service]]],
) -> None:
    services = rendered[0][1]
    assert "/prometheus" in writable_mounts(services["prometheus"])
    assert "/var/lib/grafana" in writable_mounts(services["grafana"])
    assert "/tmp" in writable_mounts(services["grafana"])
    # Console only: the image's file log would go to /var/log/grafana, read-only here.
    assert services["grafana"]["environment"]["GF_LOG_MODE"] == "console"


def test_scratch_space_is_small_and_not_executable() -> None:
    services = compose_services(profile="demo")
    for name, service in services.items():
        (tmp,) = [t for t in service.get("tmpfs", []) if str(t).split(":", 1)[0] == "/tmp"]
        options = dict(
            o.split("=", 1) if "=" in o else (o, "") for o in str(tmp).split(":", 1)[1].split(",")
        )
        assert options.get("size", "").endswith("m"), name
        assert int(options["size"][:-1]) <= 64, name
        # Docker mounts a tmpfs noexec,nosuid,nodev unless told "exec"/"suid".
        assert "exec" not in options, name
        assert "suid" not in options, name


def test_the_microphone_recorder_opens_dev_snd_without_privilege() -> None:
    recorder = compose_services(profile="mic")["recorder"]
    assert recorder["devices"] == ["/dev/snd:/dev/snd"]
    assert recorder["group_add"], "the host's audio group opens /dev/snd/* (root:audio 0660)"
    assert not recorder.get("privileged")
    assert not recorder.get("cap_add")
    assert lockdown_problems(recorder) == []


# --- docker/compose.secure.yaml ----------------------------------------------------

SECURE = OVERRIDES["secure"]
#: Each command's file options in the secure override, and which secret each is.
SECURE_FILES = {
    "relay": {
        "TLS_CERT": "relay.pem",
        "TLS_KEY": "relay.key",
        "TLS_CLIENT_CA": "ca.pem",
        "CREDENTIALS": "credentials.toml",
    },
    "record": {
        "TLS_CA": "ca.pem",
        "TLS_CERT": "recorder.pem",
        "TLS_KEY": "recorder.key",
        "TOKEN_FILE": "recorder.token",
    },
    "process": {
        "TLS_CA": "ca.pem",
        "TLS_CERT": "processor.pem",
        "TLS_KEY": "processor.key",
        "TOKEN_FILE": "processor.token",
    },
    "status": {
        "TLS_CA": "ca.pem",
        "TLS_CERT": "admin.pem",
        "TLS_KEY": "admin.key",
        "TOKEN_FILE": "admin.token",
    },
}
COMMAND_OF = {
    "relay": "relay",
    "recorder": "record",
    "recorder-pulse": "record",
    "recorder-demo": "record",
    "processor": "process",
    "processor-vad": "process",
    "processor-archive": "process",
}


@pytest.fixture(scope="module")
def secure() -> dict[str, Service]:
    services: dict[str, Service] = {}
    file, env = SECURE
    for profile in PROFILES:
        services |= compose_services(file, profile=profile, **env)
    return services


def secret_names(service: Service) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def test_secure_override_turns_on_tls_mutual_tls_and_credentials(
    secure: dict[str, Service],
) -> None:
    for name, command in COMMAND_OF.items():
        env = {k: str(v) for k, v in secure[name]["environment"].items()}
        prefix = f"AUDIOSOCKETS_{command.upper()}_"
        url = env[prefix + ("LISTEN" if command == "relay" else "RELAY")]
        assert url.startswith("tls://relay:") or url == "tls://0.0.0.0:7400", f"{name}: {url}"
        # A token only as a file: never in the environment (docker inspect shows it).
        assert prefix + "TOKEN" not in env, name
        commands = [command, "status"] if command == "relay" else [command]
        expected = {
            f"/run/secrets/{secret}" for c in commands for secret in SECURE_FILES[c].values()
        }
        for c in commands:
            for option, secret in SECURE_FILES[c].items():
                variable = f"AUDIOSOCKETS_{c.upper()}_{option}"
                assert env.get(variable) == f"/run/secrets/{secret}", f"{name}: {variable}"
        # Each service gets exactly the files it uses: a recorder never sees the
        # relay's key or the processors' token.
        assert {f"/run/secrets/{s}" for s in secret_names(secure[name])} == expected, name


def test_secure_override_sets_only_variables_the_commands_read(
    secure: dict[str, Service],
) -> None:
    # click ignores a variable no option reads: a misspelt one would leave TLS off.
    def known(command: str) -> set[str]:
        params = cli_main.commands[command].params
        return {p.envvar for p in params if isinstance(p.envvar, str)}

    for name, command in COMMAND_OF.items():
        ours = {k for k in secure[name]["environment"] if k.startswith("AUDIOSOCKETS_")}
        allowed = known(command) | {"AUDIOSOCKETS_LOG_LEVEL"}
        if command == "relay":
            allowed |= known("status")  # `docker compose exec relay audiosockets status`
        assert ours <= allowed, f"{name}: unknown {sorted(ours - allowed)}"


def test_secure_override_reads_every_secret_from_the_site_directory(
    secure: dict[str, Service],
) -> None:
    file, _ = SECURE
    raw = yaml.safe_load(file.read_text())
    used = set().union(*(secret_names(s) for s in secure.values()))
    assert set(raw["secrets"]) == used, "a secret is declared but unused, or used undeclared"
    for name, secret in raw["secrets"].items():
        assert secret["file"].startswith("${AUDIOSOCKETS_SECRETS:?"), name
        assert secret["file"].endswith("}/" + name), name
    assert "ca.key" not in used  # the CA's key signs certificates; nothing deployed needs it
    # The desktop user of recorder-pulse reads the key and token through the group.
    assert "10001" in [str(g) for g in secure["recorder-pulse"]["group_add"]]


def test_secure_override_without_the_site_directory_says_so() -> None:
    binary = require_binary("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "AUDIOSOCKETS_SECRETS"}
    done = subprocess.run(
        [binary, "-f", "compose.yaml", "-f", str(SECURE[0]), "config", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "set AUDIOSOCKETS_SECRETS to the site's directory" in done.stderr
