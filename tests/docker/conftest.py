"""Fixtures for the tests that run compose on the real Docker engine."""

from __future__ import annotations

import os
import shutil

import pytest
from docker_harness import build_images, docker_engine_available

from _support import require

# The engine may be shared with another checkout's test run: a tag of our own
# (AUDIOSOCKETS_TEST_IMAGE_TAG) keeps the two from testing each other's images.
IMAGE_TAG = os.environ.get("AUDIOSOCKETS_TEST_IMAGE_TAG", "e2e")


@pytest.fixture(scope="session")
def service_images() -> str:
    """Build (cached) the base and the three service images once; return their tag."""
    require(docker_engine_available(), "no Docker engine reachable (docker info failed)")
    require(shutil.which("docker-compose") is not None, "docker-compose (v1) is not installed")
    build_images(IMAGE_TAG)
    return IMAGE_TAG
