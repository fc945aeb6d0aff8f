"""Sources: pacing without drift, exact timestamps, WAV parsing, conversions, errors."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from recorder_fakes import FakeClock, write_pcm_wav, write_raw_wav

from audiosockets.audio import AudioFormat, SampleType
from audiosockets.convert import to_sample_type
from audiosockets.errors import ConfigError
from audiosockets.sources import (
    CapturedBlock,
    DeviceLost,
    DeviceSource,
    FileSource,
    SynthSource,
    block_frames_for,
    parse_source,
    read_wav_info,
)

MONO16 = AudioFormat(16000, 1, SampleType.INT16)


async def read_all(source: FileSource | SynthSource, limit: int = 10_000) -> list[CapturedBlock]:
    await source.open()
    blocks = []
    for _ in range(limit):
        block = await source.read()
        if block is None:
            break
        blocks.append(block)
    return blocks


# --- pacing -----------------------------------------------------------------------


async def test_pacing_is_scheduled_against_the_start_not_accumulated() -> None:
    # 333 frames at 16 kHz is 20.8125 ms: per-block sleeps would accumulate rounding.
    clock = FakeClock()
    source = SynthSource(MONO16, 333, "sine", clock=clock)
    await source.open()
    for _ in range(1000):
        await source.read()
    assert clock.deadlines[0] == 333 * 10**9 // 16000
    assert clock.deadlines[-1] == 1000 * 333 * 10**9 // 16000  # exactly 20.8125 s


async def test_a_late_loop_catches_up_and_timestamps_stay_contiguous() -> None:
    clock = FakeClock()
    source = SynthSource(MONO16, 320, "noise", clock=clock)
    await source.open()
    first = await source.read()
    assert first is not None
    clock.now += 1_000_000_000  # the event loop was blocked for a second
    blocks = [await source.read() for _ in range(60)]
    # The backlog's deadlines are already past: no real wait, no slowdown.
    assert all(d <= clock.now for d in clock.deadlines[1:51])
    stamps = [first.captured_ns] + [b.captured_ns for b in blocks if b is not None]
    assert np.all(np.diff(stamps) == 20_000_000)
    assert first.captured_ns == clock.wall_start


# --- synth ------------------------------------------------------------------------


async def test_sine_is_continuous_across_blocks_and_at_the_right_frequency() -> None:
    fmt = AudioFormat(16000, 2, SampleType.FLOAT32)
    source = SynthSource(fmt, 160, "sine", hz=1000.0, clock=FakeClock())
    blocks = [await source.read() for _ in range(100)]
    signal = np.concatenate([b.samples for b in blocks if b is not None])
    assert signal.shape == (16000, 2)
    assert signal.dtype == np.float32
    assert np.array_equal(signal[:, 0], signal[:, 1])
    assert np.array_equal(signal, source.render(0, 16000))  # blockwise == all at once
    spectrum = np.abs(np.fft.rfft(signal[:, 0]))
    assert int(np.argmax(spectrum)) == 1000  # 1 Hz bins over one second
    assert np.max(np.abs(signal)) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("kind", ["noise", "silence", "speechlike"])
async def test_other_synths_produce_the_stream_format(kind: str) -> None:
    source = SynthSource(MONO16, 1600, kind, clock=FakeClock())
    blocks = [await source.read() for _ in range(30)]  # 3 s
    signal = np.concatenate([b.samples for b in blocks if b is not None])
    assert signal.dtype == np.int16
    assert signal.shape == (48000, 1)
    if kind == "silence":
        assert not signal.any()
    else:
        assert np.abs(signal).max() > 1000
    if kind == "speechlike":  # talks for 1.5 s of every 2.5 s
        assert not signal[int(1.6 * 16000) : int(2.4 * 16000)].any()


def test_to_sample_type_scales_between_encodings() -> None:
    """Full scale to full scale: -1.0 is -32768, and int16 -> int32 is exact (<< 16)."""
    x = np.array([[-1.0], [0.0], [0.5], [1.5]])
    assert to_sample_type(x, SampleType.INT16).ravel().tolist() == [-32768, 0, 16384, 32767]
    pcm = np.array([[-32768], [16384]], dtype=np.int16)
    assert to_sample_type(pcm, SampleType.FLOAT32).ravel().tolist() == [-1.0, 0.5]
    as32 = to_sample_type(pcm, SampleType.INT32).ravel()
    assert as32.tolist() == [-2147483648, 1073741824]


# --- source specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mic", "unknown source 'mic'"),
        ("synth:square", "unknown synth 'square'"),
        ("synth:sine:abc", "frequency must be a number"),
        ("synth:sine:9000", "Nyquist"),
        ("synth:noise:3", "takes no argument"),
        ("file:", "needs a path"),
        ("file:/nonexistent/x.wav", "cannot read /nonexistent/x.wav"),
        ("file:/nonexistent/x.wav?speed=2", "unknown option 'speed'"),
        ("file:/nonexistent/x.wav?loop=maybe", "loop='maybe' must be 0 or 1"),
    ],
)
def test_bad_source_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_source(spec, MONO16, 320)


def test_source_specs_build_the_right_sources(tmp_path: Path) -> None:
    wav = write_pcm_wav(tmp_path / "a.wav", np.zeros((100, 1), np.int16), 16000)
    looped = parse_source(f"file:{wav}?loop=1", MONO16, 320)
    assert isinstance(looped, FileSource)
    assert looped.loop
    assert not looped.convert
    plain = parse_source(f"file:{wav}?loop=0&convert", MONO16, 320)
    assert isinstance(plain, FileSource)
    assert not plain.loop
    assert plain.convert
    sine = parse_source("synth:sine:220", MONO16, 320)
    assert isinstance(sine, SynthSource)
    assert sine.hz == 220.0
    device = parse_source("device:3", MONO16, 320)
    assert isinstance(device, DeviceSource)
    assert device.device == 3
    assert isinstance(parse_source("device", MONO16, 320), DeviceSource)
    assert block_frames_for(16000, 20) == 320
    with pytest.raises(ConfigError, match="positive"):
        block_frames_for(16000, 0)


# --- WAV files ------------------------------------------------------------------------


def ramp(frames: int, channels: int = 1) -> np.ndarray:
    values = (np.arange(frames * channels) % 60000) - 30000
    return values.astype(np.int16).reshape(frames, channels)


async def test_file_source_is_sample_exact_with_a_short_last_block(tmp_path: Path) -> None:
    data = ramp(1000)
    wav = write_pcm_wav(tmp_path / "ramp.wav", data, 16000)
    blocks = await read_all(FileSource(MONO16, 320, wav, clock=FakeClock()))
    assert [b.frames for b in blocks] == [320, 320, 320, 40]
    assert np.array_equal(np.concatenate([b.samples for b in blocks]), data)


async def test_looped_file_wraps_without_a_seam(tmp_path: Path) -> None:
    data = ramp(1000)
    wav = write_pcm_wav(tmp_path / "ramp.wav", data, 16000)
    source = FileSource(MONO16, 320, wav, loop=True, clock=FakeClock())
    blocks = await read_all(source, limit=10)
    assert len(blocks) == 10
    got = np.concatenate([b.samples for b in blocks])
    assert np.array_equal(got, np.concatenate([data, data, data, data[:200]]))


@pytest.mark.parametrize(
    ("tag", "bits", "dtype", "extensible"),
    [
        (1, 16, "<i2", True),
        (1, 32, "<i4", False),
        (3, 32, "<f4", False),
        (3, 32, "<f4", True),
    ],
)
def test_wav_encodings_are_read_exactly(
    tmp_path: Path, tag: int, bits: int, dtype: str, extensible: bool
) -> None:
    samples = (np.arange(200).reshape(100, 2) - 100).astype(dtype)
    wav = write_raw_wav(
        tmp_path / "x.wav", samples, 8000, tag=tag, bits=bits, extensible=extensible
    )
    info = read_wav_info(wav)
    assert info.format == AudioFormat(8000, 2, SampleType.from_dtype(dtype))
    assert info.frames == 100
    source = FileSource(info.format, 100, wav)
    assert np.array_equal(source.render(0, 100), samples)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a WAV file"),
        (b"fLaC\x00\x00\x00\x22", "is FLAC; only WAV is read"),
        (b"RIFF\x00\x00\x00\x00WAVE", "no audio data chunk"),
        (b"RIFF\x10\x00\x00\x00WAVEdata\x00\x00\x00\x00", "data before its format"),
    ],
)
def test_broken_wav_files_are_config_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_wav_info(path)


def test_unsupported_wav_encoding_is_named(tmp_path: Path) -> None:
    samples = np.zeros((10, 1), np.uint8)
    wav = write_raw_wav(tmp_path / "u8.wav", samples, 8000, tag=1, bits=8)
    with pytest.raises(ConfigError, match="8-bit PCM; supported WAV encodings"):
        read_wav_info(wav)


def test_rate_or_channel_mismatch_is_an_error_without_convert(tmp_path: Path) -> None:
    wav = write_pcm_wav(tmp_path / "s.wav", ramp(100, 2), 22050)
    with pytest.raises(ConfigError, match=r"22050 Hz with 2 channel.*--rate 22050 --channels 2"):
        FileSource(MONO16, 320, wav)


async def test_convert_resamples_and_mixes_down(tmp_path: Path) -> None:
    t = np.arange(22050) / 22050
    left = np.sin(2 * np.pi * 440 * t) * 0.5
    stereo = to_sample_type(np.stack([left, left * 0.5], axis=1), SampleType.INT16)
    wav = write_pcm_wav(tmp_path / "s.wav", stereo, 22050)
    fmt = AudioFormat(16000, 1, SampleType.FLOAT32)
    source = FileSource(fmt, 1600, wav, convert=True, clock=FakeClock())
    signal = np.concatenate([b.samples for b in await read_all(source)])
    assert signal.shape == (16000, 1)
    assert int(np.argmax(np.abs(np.fft.rfft(signal[:, 0])))) == 440
    assert np.max(np.abs(signal)) == pytest.approx(0.375, abs=0.01)  # mean of 0.5 and 0.25


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("int16", 100), ("int32", 100 * 65536), ("float32", 100 / 32768)],
)
async def test_a_stereo_int16_file_at_100_is_a_mono_stream_at_the_same_level(
    tmp_path: Path, dtype: str, expected: float
) -> None:
    """The issue's file: 2 channels of int16 100 gave 32767 / 2147483647 / 100.0."""
    wav = write_pcm_wav(tmp_path / "s.wav", np.full((1600, 2), 100, np.int16), 16000)
    fmt = AudioFormat(16000, 1, SampleType.parse(dtype))
    source = FileSource(fmt, 320, wav, convert=True, clock=FakeClock())
    signal = np.concatenate([b.samples for b in await read_all(source)])
    assert signal.dtype == fmt.dtype
    assert signal.shape == (1600, 1)
    assert np.all(signal == np.asarray(expected, dtype=fmt.dtype))


# (source rate, stream rate, frames): too few frames for one output frame at the
# stream's rate; the file would be looped modulo 0, or end before its first chunk.
TOO_SHORT = [
    (48000, 8000, 1),
    (48000, 8000, 5),
    (44100, 8000, 5),
    (22050, 8000, 2),
    (48000, 16000, 2),
]


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize(("src_rate", "dst_rate", "frames"), TOO_SHORT)
def test_a_file_too_short_for_one_output_frame_is_a_config_error(
    tmp_path: Path, loop: bool, src_rate: int, dst_rate: int, frames: int
) -> None:
    wav = write_pcm_wav(tmp_path / "short.wav", ramp(frames), src_rate)
    needed = -(-src_rate // dst_rate)
    with pytest.raises(ConfigError) as caught:
        FileSource(AudioFormat(dst_rate, 1), 160, wav, loop=loop, convert=True)
    assert str(caught.value) == (
        f"{wav} holds {frames} frame(s) at {src_rate} Hz, too few for one frame at the "
        f"stream's {dst_rate} Hz: it needs at least {needed} frames"
    )


@pytest.mark.parametrize(
    ("src_rate", "dst_rate", "frames", "out_frames"),
    [(48000, 8000, 6, 1), (44100, 8000, 6, 1), (48000, 8000, 13, 2), (8000, 48000, 1, 6)],
)
async def test_a_file_just_long_enough_yields_its_frames_plain_and_looped(
    tmp_path: Path, src_rate: int, dst_rate: int, frames: int, out_frames: int
) -> None:
    wav = write_pcm_wav(tmp_path / "short.wav", np.full((frames, 1), 1000, np.int16), src_rate)
    fmt = AudioFormat(dst_rate, 1)
    plain = await read_all(FileSource(fmt, 160, wav, convert=True, clock=FakeClock()))
    assert [b.frames for b in plain] == [out_frames]
    looped = FileSource(fmt, 160, wav, loop=True, convert=True, clock=FakeClock())
    blocks = await read_all(looped, limit=3)
    assert [b.frames for b in blocks] == [160, 160, 160]
    assert np.all(np.concatenate([b.samples for b in blocks]) == 1000)


def test_convert_refuses_stereo_to_six_channels(tmp_path: Path) -> None:
    wav = write_pcm_wav(tmp_path / "s.wav", ramp(100, 2), 16000)
    with pytest.raises(ConfigError, match="only to or from mono"):
        FileSource(AudioFormat(16000, 6), 320, wav, convert=True)


# --- the device hand-off (no PortAudio needed) -----------------------------------------


def _status(overflow: bool = False) -> SimpleNamespace:
    return SimpleNamespace(input_overflow=overflow)


def _time(adc: float) -> SimpleNamespace:
    return SimpleNamespace(inputBufferAdcTime=adc, currentTime=adc + 0.01)


async def test_device_callback_hands_off_from_another_thread() -> None:
    source = DeviceSource(MONO16, 160, ring_seconds=0.0)  # 16-slot ring
    source._loop = __import__("asyncio").get_running_loop()
    source._stream = object()
    source._offset_ns = 5_000_000_000
    blocks = [np.full((160, 1), i, np.int16) for i in range(40)]

    def portaudio_thread() -> None:
        for i, b in enumerate(blocks[:10]):
            source._callback(b, 160, _time(100.0 + i * 0.01), _status(overflow=i == 3))

    thread = threading.Thread(target=portaudio_thread)
    thread.start()
    got = [await source.read() for _ in range(10)]
    thread.join()
    assert [int(b.samples[0, 0]) for b in got if b is not None] == list(range(10))
    assert got[0] is not None
    assert got[0].captured_ns == 105_000_000_000  # ADC time + wall-clock offset
    assert source.overflows == 1
    assert source.dropped == 0
    # The callback's buffer is reused by PortAudio: we must hold a copy.
    blocks[0][:] = 99
    assert got[0].samples[0, 0] == 0


async def test_device_ring_overflow_drops_the_newest_and_counts() -> None:
    source = DeviceSource(MONO16, 160, ring_seconds=0.0)  # 16 slots
    source._loop = __import__("asyncio").get_running_loop()
    source._stream = object()
    for i in range(20):
        source._callback(np.full((160, 1), i, np.int16), 160, _time(float(i)), _status())
    assert source.dropped == 4
    got = [await source.read() for _ in range(16)]
    assert [int(b.samples[0, 0]) for b in got if b is not None] == list(range(16))


async def test_a_silent_device_is_reported_lost() -> None:
    source = DeviceSource(MONO16, 160, stall_timeout=0.05)
    source._loop = __import__("asyncio").get_running_loop()
    source._stream = object()
    source._stall_timeout = 0.05
    with pytest.raises(DeviceLost, match="delivered no audio"):
        await source.read()
    source._on_finished()
    with pytest.raises(DeviceLost, match="stopped delivering"):
        await source.read()


async def test_device_stamps_advance_by_one_block_while_adc_times_converge_after_open() -> None:
    """PortAudio through PulseAudio/ALSA reports the first block's ADC time ~0.5 s in the
    past, converging over ~100 blocks; stamps used to follow (20 ms chunks 25 ms apart)."""
    source = DeviceSource(MONO16, 160, ring_seconds=4.0)  # 10 ms blocks
    source._loop = __import__("asyncio").get_running_loop()
    source._stream = object()
    source._offset_ns = 5_000_000_000
    stamps = []
    for i in range(300):
        true_adc = 100.0 + i * 0.01
        error = -0.5 * max(0.0, 1 - i / 100)
        info = SimpleNamespace(inputBufferAdcTime=true_adc + error, currentTime=true_adc + 0.01)
        source._callback(np.zeros((160, 1), np.int16), 160, info, _status())
        block = await source.read()
        assert block is not None
        stamps.append(block.captured_ns)
    steps = np.diff(stamps)
    assert np.all(np.abs(steps - 10_000_000) <= 10_000)  # 1000 ppm of a block at most
    assert stamps[0] == 105_000_000_000  # anchored at the first callback, not 0.5 s back
    assert abs(stamps[-1] - (105_000_000_000 + 299 * 10_000_000)) <= 2_000_000


async def test_device_stamps_skip_exactly_the_blocks_lost_in_a_full_ring() -> None:
    source = DeviceSource(MONO16, 160, ring_seconds=0.0)  # 16 slots
    source._loop = __import__("asyncio").get_running_loop()
    source._stream = object()
    for i in range(20):  # 4 blocks do not fit: dropped, their frames counted as lost
        source._callback(np.full((160, 1), i, np.int16), 160, _time(100.0 + i * 0.01), _status())
    got = [await source.read() for _ in range(16)]
    source._callback(np.full((160, 1), 20, np.int16), 160, _time(100.2), _status())
    after = await source.read()
    assert after is not None
    stamps = [b.captured_ns for b in got if b is not None] + [after.captured_ns]
    assert np.diff(stamps).tolist() == [10_000_000] * 15 + [50_000_000]  # 4 blocks missing
    assert source.capture_clock.lost_frames == 4 * 160
