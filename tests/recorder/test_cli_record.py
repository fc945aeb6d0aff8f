"""``audiosockets record`` and ``audiosockets devices`` through click's runner (and,
for signals, as a real process): one line per error, named exit codes, no traceback."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from recorder_fakes import spawn_record, write_pcm_wav

from _support import wait_until
from audiosockets import audio_diagnose, sources
from audiosockets.audio import Chunk
from audiosockets.cli import main
from audiosockets.client import Subscriber
from audiosockets.errors import AddressInUse, ConfigError, DeviceError
from audiosockets.recorder import Recorder, RecorderConfig
from audiosockets.relay import Relay


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_line_error(result: Result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("audiosockets: error: ")
    assert text in lines[0]
    assert "Traceback" not in result.output


# --- devices ---------------------------------------------------------------------------


def fake_devices(
    monkeypatch: pytest.MonkeyPatch, devices: list[dict[str, Any]], default: int | None
) -> None:
    monkeypatch.setattr(sources, "list_input_devices", lambda: (devices, default))


def test_devices_lists_inputs_and_marks_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_devices(
        monkeypatch,
        [
            {"index": 0, "name": "USB mic", "max_input_channels": 1, "default_samplerate": 48000.0},
            {"index": 3, "name": "pulse", "max_input_channels": 32, "default_samplerate": 44100.0},
        ],
        default=3,
    )
    result = invoke("devices")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3  # header + two devices
    usb = next(line for line in lines if "USB mic" in line)
    pulse = next(line for line in lines if "pulse" in line)
    assert usb.startswith(" ")
    assert pulse.startswith("*")
    assert "48000 Hz" in usb
    assert "32" in pulse.split()


def test_devices_on_a_machine_without_any_says_so_in_one_sentence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_devices(monkeypatch, [], default=None)
    monkeypatch.setattr(audio_diagnose, "diagnose_capture", lambda: None)
    result = invoke("devices")
    assert_one_line_error(result, DeviceError.exit_code, "no audio input devices found")


def test_devices_without_any_names_the_cause_it_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    # A container given no /dev/snd and no sound server socket.
    fake_devices(monkeypatch, [], default=None)
    monkeypatch.setattr(
        audio_diagnose,
        "diagnose_capture",
        lambda: (
            "sound server socket missing at /run/pulse/native (is PulseAudio/PipeWire running there?)"
        ),
    )
    assert_one_line_error(
        invoke("devices"),
        DeviceError.exit_code,
        "no audio input devices found: PortAudio sees no sound card or sound server "
        "(use --source synth:sine or file:PATH to record without one); "
        "cause: sound server socket missing at /run/pulse/native",
    )


def test_devices_without_portaudio_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise DeviceError("PortAudio is not available (library not found); install libportaudio2")

    monkeypatch.setattr(sources.device, "_import_sounddevice", missing)
    assert_one_line_error(invoke("devices"), DeviceError.exit_code, "install libportaudio2")


# --- record: bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--source", "mic"], "unknown source 'mic'"),
        (["--source", "synth:sine:99999"], "Nyquist"),
        (["--relay", "http://relay:7400", "--source", "synth:noise"], "must start with tcp://"),
        (["--relay", "tcp://relay:notaport", "--source", "synth:noise"], "invalid port"),
        (["--source", "file:/no/such/file.wav"], "cannot read /no/such/file.wav"),
    ],
)
def test_record_config_errors(args: list[str], text: str) -> None:
    assert_one_line_error(
        invoke("record", "--metrics-port", "0", *args), ConfigError.exit_code, text
    )


def test_record_rate_mismatch_names_the_fix(tmp_path: Path) -> None:
    wav = write_pcm_wav(tmp_path / "a.wav", np.zeros((100, 2), np.int16), 44100)
    result = invoke("record", "--metrics-port", "0", "--source", f"file:{wav}")
    assert_one_line_error(result, ConfigError.exit_code, "pass --rate 44100 --channels 2")


@pytest.mark.parametrize("options", ["?loop=1&convert=1", "?convert=1"])
def test_record_a_file_too_short_for_one_chunk_exits_2_at_once(
    tmp_path: Path, options: str
) -> None:
    wav = write_pcm_wav(tmp_path / "one.wav", np.zeros((1, 1), np.int16), 48000)
    result = invoke(
        "record", "--metrics-port", "0", "--rate", "8000", "--source", f"file:{wav}{options}"
    )
    assert_one_line_error(
        result, ConfigError.exit_code, "holds 1 frame(s) at 48000 Hz, too few for one frame"
    )


def test_record_flags_are_environment_variables() -> None:
    result = invoke(
        "record",
        env={"AUDIOSOCKETS_RECORD_SOURCE": "tape", "AUDIOSOCKETS_RECORD_METRICS_PORT": "0"},
    )
    assert_one_line_error(result, ConfigError.exit_code, "unknown source 'tape'")


def test_record_unknown_device_is_a_device_error() -> None:
    sd = pytest.importorskip("sounddevice", reason="PortAudio (libportaudio2) is not installed")
    del sd
    result = invoke("record", "--metrics-port", "0", "--source", "device:no-such-device-xyz")
    assert_one_line_error(result, DeviceError.exit_code, "no-such-device-xyz")


class FakePortAudioError(Exception):
    pass


def fake_sounddevice(*, settings_error: str | None = None, open_error: str | None = None) -> Any:
    def check_input_settings(**_: Any) -> None:
        if settings_error:
            raise FakePortAudioError(settings_error, -9997)

    def input_stream(**_: Any) -> Any:
        raise FakePortAudioError(open_error or "no", -9985)

    return SimpleNamespace(
        PortAudioError=FakePortAudioError,
        default=SimpleNamespace(device=[0, 0]),
        query_devices=lambda device=None, kind=None: {"name": "Fake mic", "index": 0},
        query_hostapis=lambda index: {"default_input_device": 0},
        check_input_settings=check_input_settings,
        InputStream=input_stream,
    )


def test_record_unsupported_format_is_a_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_sounddevice(settings_error="Invalid sample rate")
    monkeypatch.setattr(sources.device, "_import_sounddevice", lambda: fake)
    result = invoke("record", "--metrics-port", "0", "--source", "device", "--rate", "12345")
    assert_one_line_error(result, DeviceError.exit_code, "cannot capture 12345 Hz, 1 ch, int16")
    assert "Invalid sample rate" in result.stderr


def test_record_busy_device_is_a_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_sounddevice(open_error="Device unavailable")
    monkeypatch.setattr(sources.device, "_import_sounddevice", lambda: fake)
    result = invoke("record", "--metrics-port", "0", "--source", "device:0")
    assert_one_line_error(result, DeviceError.exit_code, "busy or gone?): Device unavailable")


# --- record: signals, as a real process -------------------------------------------------------


async def test_sigterm_with_the_relay_away_exits_zero_within_the_flush_deadline() -> None:
    process = spawn_record(
        "--relay", "tcp://127.0.0.1:1", "--source", "synth:noise", "--flush-seconds", "0.5"
    )
    try:
        # Started once it logs that it records (the relay being away is no reason to stop).
        line = await asyncio.to_thread(process.stderr.readline)  # type: ignore[union-attr]
        assert b"recording" in line, line
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(process.communicate, timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err.decode()
    assert time.monotonic() - began < 5.0
    assert b"Traceback" not in err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_flushes_everything_captured_to_the_relay(
    relay: Relay, stop: signal.Signals
) -> None:
    """SIGHUP (the terminal closed) stops it like SIGTERM: its default action exited
    129 at once and lost the in-memory spool."""
    received: list[Chunk] = []
    async with Subscriber(relay.url, pattern="term-*", name="term-sub", start="earliest") as sub:

        async def drain() -> None:
            async for chunk in sub:
                received.append(chunk)

        reader = asyncio.create_task(drain())
        process = spawn_record("--relay", relay.url, "--stream", "term-1", "--source", "synth:sine")
        try:
            await wait_until(lambda: len(received) >= 10, timeout=20, what="ten chunks")
            process.send_signal(stop)
            _, err = await asyncio.to_thread(process.communicate, timeout=15)
            assert process.returncode == 0, err.decode()
            # The publisher says goodbye after its flush: the relay has the last chunk.
            last = relay.metrics.registry.get_sample_value(
                "audiosockets_chunks_received_total", {"stream": "term-1"}
            )
            await wait_until(lambda: len(received) >= (last or 0), timeout=10, what="the tail")
        finally:
            if process.poll() is None:
                process.kill()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    assert last is not None
    assert last >= 10
    # Everything the recorder captured before SIGTERM reached the relay.
    assert (
        f"recorder stopped: {int(last)} chunk(s) captured, all taken by the relay" in err.decode()
    )
    assert [c.seq for c in received] == list(range(int(last)))


def test_record_unusable_spool_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke(
        "record",
        "--metrics-port",
        "0",
        "--source",
        "synth:noise",
        "--spool-dir",
        str(blocker / "x"),
    )
    assert_one_line_error(result, ConfigError.exit_code, "cannot use spool directory")


def test_record_spool_memory_seconds_needs_a_spool_dir(tmp_path: Path) -> None:
    wav = write_pcm_wav(tmp_path / "a.wav", np.zeros((320, 1), np.int16), 16000)
    result = invoke(  # a finite source: without the check this ends, exit 0
        "record",
        "--relay",
        "tcp://127.0.0.1:1",
        "--flush-seconds",
        "0",
        "--source",
        f"file:{wav}",
        env={
            "AUDIOSOCKETS_RECORD_SPOOL_MEMORY_SECONDS": "2",
            "AUDIOSOCKETS_RECORD_METRICS_PORT": "0",
        },
    )
    assert_one_line_error(result, ConfigError.exit_code, "--spool-memory-seconds needs --spool-dir")


def test_record_spool_memory_seconds_must_be_positive(tmp_path: Path) -> None:
    result = invoke(
        "record",
        "--metrics-port",
        "0",
        "--source",
        "synth:noise",
        "--spool-dir",
        str(tmp_path),
        "--spool-memory-seconds",
        "0",
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--spool-memory-seconds'" in result.stderr


def test_record_refuses_a_chunk_larger_than_the_memory_spool_bound() -> None:
    # 5 ms of 64 ch float32 at 768 kHz is 983040 bytes; the bound is 0.5 MiB.
    result = invoke(
        *("record", "--metrics-port", "0", "--source", "synth:noise", "--rate", "768000"),
        *("--channels", "64", "--dtype", "float32", "--block-ms", "5"),
        env={"AUDIOSOCKETS_RECORD_SPOOL_MAX_MIB": "0.5"},
    )
    assert_one_line_error(
        result, ConfigError.exit_code, "is 983040 bytes, more than --spool-max-mib 0.5 holds"
    )


def test_the_recorders_publisher_holds_at_most_spool_max_mib() -> None:
    recorder = Recorder(RecorderConfig(relay="tcp://127.0.0.1:9", spool_max_mib=2))
    assert getattr(recorder.publisher, "history_bytes", None) == 2 << 20
    assert RecorderConfig().spool_max_mib == 512  # an edge PC's worth


def test_a_memory_part_beyond_the_spool_is_clamped_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RecorderConfig(
        source="synth:noise", spool_seconds=4.0, spool_dir=tmp_path, memory_seconds=30.0
    )
    assert config.history_seconds == 4.0
    assert RecorderConfig(spool_dir=tmp_path, memory_seconds=0.5).history_seconds == 0.5
    assert RecorderConfig(spool_dir=tmp_path).history_seconds == 10.0
    caplog.set_level(logging.INFO, "audiosockets.recorder")
    recorder = Recorder(config)
    assert recorder.disk is not None
    recorder.disk.close()
    assert (
        "--spool-memory-seconds 30 is more than --spool-seconds 4: memory holds 4 s" in caplog.text
    )
    assert "a SIGKILL or power cut loses what is in memory" in caplog.text


def test_record_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke(
            "record", "--metrics-port", str(port), "--metrics-host", "0.0.0.0",
            "--source", "synth:noise",
        )  # fmt: skip
    assert_one_line_error(result, AddressInUse.exit_code, f"cannot serve metrics on 0.0.0.0:{port}")
