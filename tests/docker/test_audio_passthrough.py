"""Host audio passthrough on the real engine, the way the README tells a user to do it.

**PulseAudio path.** A PulseAudio daemon runs as an ordinary user (not root, not the
container's uid 10001) with a desktop's defaults: socket ``$XDG_RUNTIME_DIR/pulse/native``
in a 0700 directory, cookie authentication, cookie 0600 in that user's home. The
host has no ``/dev/snd``. The documented command (``docker-compose --profile pulse
up``, with ``PULSE_UID``/``PULSE_GID``/``PULSE_SOCKET`` set as ``.env`` says) starts
the relay, the PulseAudio recorder and the archive processor; espeak-ng speech is
played into the daemon's default sink, whose monitor is the default source. The
archive must hold that speech (normalised correlation >= 0.95, nothing dropped,
no sequence gap).

**/dev/snd path, no sound card.** The microphone recorder's image, given no
``/dev/snd``, must say why it cannot record (the cause, not just "no device") and
exit 5; ``audiosockets devices`` likewise. Compose itself refuses the
microphone service on such a host, naming ``/dev/snd``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from docker_harness import (
    HERE,
    ROOT,
    Compose,
    archived_segments,
    docker,
    health,
    missing_seqs,
    poll,
    scrape,
)

from audiosockets.sources import read_wav_info
from recorder.pulse_harness import (
    PulseServer,
    best_normalised_correlation,
    espeak_wav,
    start_pulse,
)

pytestmark = [pytest.mark.docker, pytest.mark.audio, pytest.mark.slow, pytest.mark.timeout(600)]

DESKTOP_USER = (4242, 4242)  # the desktop user: neither root nor the images' 10001
RATE = 22050  # espeak-ng's rate, the sink's and the recorder's: nothing resampled
STREAM = "pulse-1"
SPEECH = "Audio sockets record what the microphone hears, every sample, through the sound server."


def read_samples(wav: Path) -> np.ndarray:
    info = read_wav_info(wav)
    raw = wav.read_bytes()[
        info.data_offset : info.data_offset + info.frames * info.format.frame_bytes
    ]
    return np.frombuffer(raw, dtype=info.format.dtype).reshape(-1, info.format.channels)[:, 0]


def archived_audio(directory: Path, stream: str) -> np.ndarray:
    """The stream's closed segments, in sequence order, as one signal."""
    parts = []
    sidecars = sorted(
        directory.glob("*.json"), key=lambda p: json.loads(p.read_text())["first_seq"]
    )
    for sidecar in sidecars:
        if json.loads(sidecar.read_text())["stream"] == stream:
            parts.append(read_samples(sidecar.with_suffix(".wav")))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


@dataclass
class Evidence:
    recorder_health: str = ""
    recorder_user: str = ""
    recorder_drops: float = -1.0
    relay_drops: dict[str, int] = field(default_factory=dict)
    last_seq: int = -1
    missing: list[int] = field(default_factory=list)
    correlation: float = 0.0
    archived_seconds: float = 0.0
    pulse_log: str = ""


def must(ok: bool, what: str, compose: Compose) -> None:
    if not ok:
        raise AssertionError(f"timed out waiting for {what}\n{compose.logs()}")


def run_pulse_scenario(compose: Compose, pulse: PulseServer, speech: Path, ev: Evidence) -> None:
    compose.up(["relay", "processor-archive", "recorder-pulse"])
    (recorder,) = compose.containers("recorder-pulse")
    must(poll(lambda: health(recorder) == "healthy", 90), "a healthy recorder", compose)
    ev.recorder_health = health(recorder)
    ev.recorder_user = docker("inspect", "--format", "{{.Config.User}}", recorder).strip()

    def publishing() -> bool:
        table = {s["name"]: s for s in compose.relay_status()["streams"]}
        return STREAM in table and table[STREAM]["last_seq"] > 25

    must(poll(publishing, 60), f"stream {STREAM} at the relay", compose)
    player = pulse.play(speech)
    assert player.wait(timeout=60) == 0, player.stderr.read() if player.stderr else ""
    # One more second of silence after the speech, then stop (the recorder flushes).
    seq_after = {s["name"]: s["last_seq"] for s in compose.relay_status()["streams"]}[STREAM]
    must(
        poll(
            lambda: (
                {s["name"]: s["last_seq"] for s in compose.relay_status()["streams"]}[STREAM]
                > seq_after + 50
            ),
            30,
        ),
        "a second of audio after the speech",
        compose,
    )
    ev.recorder_drops = scrape(recorder, 9401).value("audiosockets_chunks_dropped_total")
    compose.run("stop", "recorder-pulse")
    status = compose.relay_status()
    ev.relay_drops = dict(status["drops"])
    ev.last_seq = {s["name"]: s["last_seq"] for s in status["streams"]}[STREAM]
    must(
        poll(
            lambda: all(sub["lag_chunks"] == 0 for sub in compose.relay_status()["subscribers"]), 30
        ),
        "the archive processor catching up",
        compose,
    )
    compose.run("stop", "processor-archive")  # closes the open segment


@pytest.fixture(scope="module")
def pulse_passthrough(
    tmp_path_factory: pytest.TempPathFactory, service_images: str
) -> Iterator[Evidence]:
    workdir = tmp_path_factory.mktemp("pulse-passthrough")
    archive = workdir / "archive"
    archive.mkdir()
    os.chown(archive, 10001, 10001)  # the processor's uid, as the README says
    pulse = start_pulse(rate=RATE, channels=1, user=DESKTOP_USER)
    # In the desktop user's home: paplay runs as that user.
    speech = espeak_wav(pulse.root / "speech.wav", SPEECH)
    os.chown(speech, *DESKTOP_USER)
    compose = Compose(
        f"audiosockets-pulse-{os.getpid()}",
        [ROOT / "compose.yaml", HERE / "compose.passthrough.yaml"],
        {
            "AUDIOSOCKETS_IMAGE_TAG": service_images,
            "RELAY_PUBLISH": "127.0.0.1:",
            "PULSE_UID": str(DESKTOP_USER[0]),
            "PULSE_GID": str(DESKTOP_USER[1]),
            "PULSE_SOCKET": str(pulse.socket),
            "AUDIOSOCKETS_RECORD_STREAM": STREAM,
            "AUDIOSOCKETS_RECORD_RATE": str(RATE),
            "E2E_DIR": str(workdir),
        },
        profiles=["pulse"],
    )
    evidence = Evidence()
    try:
        run_pulse_scenario(compose, pulse, speech, evidence)
        segments = archived_segments(archive)
        evidence.missing = missing_seqs(segments, STREAM, evidence.last_seq)
        recorded = archived_audio(archive, STREAM)
        evidence.archived_seconds = len(recorded) / RATE
        evidence.correlation = best_normalised_correlation(read_samples(speech), recorded)
        evidence.pulse_log = pulse.log
        yield evidence
    finally:
        compose.down()
        pulse.stop()


def test_the_pulse_recorder_runs_as_the_desktop_user(pulse_passthrough: Evidence) -> None:
    assert pulse_passthrough.recorder_user == f"{DESKTOP_USER[0]}:{DESKTOP_USER[1]}"
    assert pulse_passthrough.recorder_health == "healthy"
    assert "Denied access" not in pulse_passthrough.pulse_log


def test_the_archive_holds_the_speech(pulse_passthrough: Evidence) -> None:
    ev = pulse_passthrough
    print(f"correlation {ev.correlation:.3f} over {ev.archived_seconds:.1f} s archived")
    assert ev.archived_seconds > 2.0
    assert ev.correlation >= 0.95, f"correlation {ev.correlation:.3f}"


def test_nothing_was_dropped_or_missed(pulse_passthrough: Evidence) -> None:
    ev = pulse_passthrough
    assert ev.last_seq > 0
    assert ev.recorder_drops == 0.0
    assert ev.relay_drops == {}
    assert ev.missing == []


# --- /dev/snd on a host without a sound card --------------------------------------------


def test_the_mic_recorder_without_a_sound_card_says_why(service_images: str) -> None:
    if Path("/dev/snd").exists():
        pytest.skip("this host has a sound card")  # the point is a host without one
    image = f"audiosockets/recorder:{service_images}"
    for args in (["record", "--metrics-port", "0"], ["devices"]):
        done = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", image, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 5, done.stderr
        assert len(lines) == 1, done.stderr
        assert "cause: no sound card: /dev/snd does not exist here" in lines[0], lines[0]


def test_compose_refuses_the_mic_recorder_without_dev_snd(service_images: str) -> None:
    if Path("/dev/snd").exists():
        pytest.skip("this host has a sound card")
    compose = Compose(
        f"audiosockets-nosnd-{os.getpid()}",
        [ROOT / "compose.yaml"],
        {"AUDIOSOCKETS_IMAGE_TAG": service_images, "RELAY_PUBLISH": "127.0.0.1:"},
        profiles=["mic"],
    )
    try:
        compose.run("up", "-d", "--no-build", "relay", check=True)
        files = [arg for f in compose.files for arg in ("-f", str(f))]
        done = subprocess.run(
            [compose.binary, "--project-directory", str(ROOT), *files, "--profile", "mic",
             "up", "-d", "--no-build", "recorder"],
            cwd=ROOT, env=compose.env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert done.returncode != 0
        assert "/dev/snd" in done.stderr
    finally:
        compose.down()
