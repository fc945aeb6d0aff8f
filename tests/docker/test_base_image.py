"""The registry-free base image is built once: later runs reuse the image or the cached rootfs.

A fake ``debootstrap`` that fails loudly is first on PATH, so any attempt to
bootstrap again fails the test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from docker_harness import HERE

pytestmark = pytest.mark.docker

SCRIPT = HERE / "build_base_image.sh"
CACHE = Path(os.environ.get("AUDIOSOCKETS_CACHE_DIR", "/var/cache/audiosockets"))


def run_without_debootstrap(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "debootstrap"
    fake.write_text("#!/bin/sh\necho 'debootstrap ran again' >&2\nexit 99\n")
    fake.chmod(0o755)
    return subprocess.run(
        [str(SCRIPT)],
        env={**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_existing_base_image_is_reused(service_images: str, tmp_path: Path) -> None:
    done = run_without_debootstrap(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "already present" in done.stdout


def test_cached_rootfs_is_imported_without_bootstrapping(
    service_images: str, tmp_path: Path
) -> None:
    assert (CACHE / "rootfs-bookworm.tar").is_file()
    image = f"audiosockets/base-cache-test:{os.getpid()}"
    try:
        done = run_without_debootstrap(tmp_path, AUDIOSOCKETS_BASE_IMAGE=image)
        assert done.returncode == 0, done.stderr
        assert "importing" in done.stdout
        python = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                image,
                "python3",
                "-c",
                "import venv, ctypes.util as u; print(u.find_library('portaudio'))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert python.stdout.strip() == "libportaudio.so.2", python.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
