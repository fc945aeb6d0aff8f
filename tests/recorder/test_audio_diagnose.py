"""The cause of "no audio input", found by looking: each cause set up for real, then named.

Sound server causes use real paths and sockets (a missing path, the directory
Docker leaves at a missing bind-mount source, a socket nobody listens on) and a
real PulseAudio running as another user with a desktop's default cookie
authentication, which refuses us. ALSA causes use a stand-in for ``/dev/snd``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pulse_harness import start_pulse

from audiosockets.audio_diagnose import (
    diagnose_alsa,
    diagnose_capture,
    diagnose_sound_server,
    pulse_socket,
)

DESKTOP_USER = (4242, 4242)  # an ordinary user id no process of the test runs as


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("unix:/run/pulse/native", Path("/run/pulse/native")),
        ("/run/pulse/native", Path("/run/pulse/native")),
        ("unix:/a/native tcp:host", Path("/a/native")),  # the first of a list is tried first
        ("tcp:localhost:4713", None),
    ],
)
def test_the_socket_comes_from_pulse_server(server: str, expected: Path | None) -> None:
    assert pulse_socket({"PULSE_SERVER": server}, Path("/nonexistent")) == expected


def test_an_alsa_default_of_pulse_means_the_default_socket(tmp_path: Path) -> None:
    conf = tmp_path / "asound.conf"
    conf.write_text("pcm.!default { type pulse }\nctl.!default { type pulse }\n")
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert pulse_socket(env, conf) == Path("/run/user/1000/pulse/native")
    assert pulse_socket({}, conf) == Path(f"/run/user/{os.getuid()}/pulse/native")
    conf.write_text("pcm.!default { type hw card 0 }\n")
    assert pulse_socket(env, conf) is None  # plain ALSA: no sound server meant


def test_a_missing_socket_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "pulse" / "native"
    cause = diagnose_capture({"PULSE_SERVER": f"unix:{missing}"})
    assert cause == (
        f"sound server socket missing at {missing} (is PulseAudio/PipeWire running there?)"
    )


def test_the_directory_docker_leaves_for_a_missing_socket_is_named(tmp_path: Path) -> None:
    made_by_docker = tmp_path / "native"
    made_by_docker.mkdir()
    cause = diagnose_sound_server(made_by_docker)
    assert cause is not None
    assert cause.startswith(f"{made_by_docker} is a directory, not the sound server's socket")


def test_a_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "native"
    path.write_text("")
    assert (
        diagnose_sound_server(path) == f"{path} is not a socket, so no sound server listens there"
    )


def test_a_socket_nobody_listens_on_is_named(tmp_path: Path) -> None:
    path = tmp_path / "native"
    with socket.socket(socket.AF_UNIX) as left_behind:  # a crashed server's socket file
        left_behind.bind(str(path))
    assert diagnose_sound_server(path) == (
        f"nothing listens on the sound server socket {path} (the server is not running)"
    )


@pytest.mark.audio
def test_a_desktop_pulseaudio_refuses_another_user_and_that_is_named() -> None:
    # PulseAudio as an ordinary user, default cookie authentication; we are not
    # that user and have no cookie: exactly the container at uid 10001.
    server = start_pulse(rate=16000, user=DESKTOP_USER)
    try:
        assert server.cookie.stat().st_mode & 0o777 == 0o600
        cause = diagnose_sound_server(server.socket)
        assert cause is not None
        assert cause.startswith(f"authentication refused by the sound server at {server.socket}")
        assert "Denied access to client with invalid authentication data" in server.log
    finally:
        server.stop()


@pytest.mark.audio
def test_a_sound_server_that_admits_us_is_no_cause() -> None:
    server = start_pulse(rate=16000)
    try:
        assert diagnose_sound_server(server.socket) is None
    finally:
        server.stop()


def test_no_dev_snd_is_no_sound_card(tmp_path: Path) -> None:
    cause = diagnose_alsa(tmp_path / "snd")
    assert cause is not None
    assert cause.startswith(f"no sound card: {tmp_path / 'snd'} does not exist here")
    # And that is what a machine without a sound server setting is told.
    assert diagnose_capture({}, asound_conf=tmp_path / "none", dev_snd=tmp_path / "snd") == cause


def test_a_card_without_capture_nodes_is_named(tmp_path: Path) -> None:
    snd = tmp_path / "snd"
    snd.mkdir()
    (snd / "pcmC0D0p").write_bytes(b"")  # playback only
    (snd / "controlC0").write_bytes(b"")
    assert diagnose_alsa(snd) == (
        f"no capture device: {snd} holds no pcmC*D*c node (no microphone input)"
    )


def test_a_capture_node_that_opens_is_no_cause(tmp_path: Path) -> None:
    snd = tmp_path / "snd"
    snd.mkdir()
    (snd / "pcmC0D0c").write_bytes(b"")
    assert diagnose_alsa(snd) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file: no permission error")
def test_a_capture_node_we_may_not_open_names_the_group(tmp_path: Path) -> None:
    snd = tmp_path / "snd"
    snd.mkdir()
    node = snd / "pcmC0D0c"
    node.write_bytes(b"")
    node.chmod(0)
    cause = diagnose_alsa(snd)
    assert cause is not None
    assert cause.startswith(f"no permission to open {node}")
    assert "AUDIO_GID" in cause
