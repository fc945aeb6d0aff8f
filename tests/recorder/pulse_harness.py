"""A private PulseAudio server with a null sink, so PortAudio captures real audio
on a machine without a sound card.

The daemon runs in the foreground as our child (never ``-D``), with no default
script (``-n``): only the native protocol on a socket in a temp dir and one null
sink, whose monitor is the default source. Clients find it through
``PULSE_SERVER``; PortAudio reaches it through ALSA's ``pulse`` plugin
(libasound2-plugins), which makes ALSA's ``default`` device PulseAudio whenever a
server is reachable when the client process starts. So the recorder under test
runs as a subprocess started with ``PulseServer.env``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _support import require

SINK = "audiosockets_test"
TOOLS = ("pulseaudio", "pactl", "paplay")


def require_pulse() -> None:
    for tool in TOOLS:
        require(
            shutil.which(tool) is not None,
            f"{tool} is not installed (apt: pulseaudio, pulseaudio-utils)",
        )
    require(
        Path("/usr/lib/x86_64-linux-gnu/alsa-lib/libasound_module_pcm_pulse.so").exists()
        or any(Path("/usr/lib").glob("*/alsa-lib/libasound_module_pcm_pulse.so")),
        "ALSA's pulse plugin is not installed (apt: libasound2-plugins)",
    )


@dataclass
class PulseServer:
    """A daemon we own; ``env`` is what a client process needs to reach it.

    ``user`` (uid, gid): the daemon runs as that ordinary user, the way a desktop
    runs it: default socket ``$XDG_RUNTIME_DIR/pulse/native`` in a 0700 directory,
    cookie authentication on (``~/.config/pulse/cookie``, 0600). Our own tools
    (pactl, paplay) then run as that user too (``setpriv``; needs root).
    """

    root: Path
    rate: int
    channels: int
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    sink: str = SINK
    user: tuple[int, int] | None = None

    @property
    def socket(self) -> Path:
        if self.user is not None:
            return self.root / "run" / "pulse" / "native"
        return self.root / "run" / "native"

    @property
    def cookie(self) -> Path:
        return self.root / ".config" / "pulse" / "cookie"

    def as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        uid, gid = self.user
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]

    @property
    def log(self) -> str:
        path = self.root / "pulseaudio.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pactl(self, *args: str) -> str:
        done = subprocess.run(
            self.as_user(["pactl", *args]),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pactl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def launch(self, timeout: float = 15.0) -> None:
        """Start the daemon (again, after ``kill``) and wait until it answers."""
        with (self.root / "pulseaudio.log").open("ab") as log:
            # A desktop's default: the socket where libpulse looks, cookie auth.
            native = (
                "module-native-protocol-unix"
                if self.user is not None
                else f"module-native-protocol-unix socket={self.socket} auth-anonymous=1"
            )
            self.process = subprocess.Popen(
                self.as_user(
                    [
                        "pulseaudio",
                        "--daemonize=no",
                        "-n",  # no default.pa: load exactly what we say
                        "--exit-idle-time=-1",
                        "--use-pid-file=no",
                        "--disable-shm=yes",
                        "--log-target=stderr",
                        "--log-level=warning",
                        "-L",
                        native,
                        "-L",
                        f"module-null-sink sink_name={SINK} rate={self.rate} "
                        f"channels={self.channels} sink_properties=device.description=audiosockets-test",
                    ]
                ),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"pulseaudio exited with {process.returncode}: {self.log[-2000:]}"
                )
            try:
                self.pactl("info")
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pulseaudio did not answer within {timeout:g} s: {self.log[-2000:]}"
                    ) from None
                time.sleep(0.05)
        self.pactl("set-default-sink", SINK)
        self.pactl("set-default-source", f"{SINK}.monitor")

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        """Start playing ``wav`` into the null sink (paplay paces it in real time)."""
        return subprocess.Popen(
            self.as_user(["paplay", f"--device={self.sink}", str(wav)]),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def kill(self) -> None:
        """Vanish without warning, as a crashed sound server or an unplugged card."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.socket.unlink(missing_ok=True)

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


def start_pulse(
    rate: int = 22050,
    channels: int = 1,
    timeout: float = 15.0,
    user: tuple[int, int] | None = None,
) -> PulseServer:
    """Start a daemon whose null sink runs at ``rate``/``channels`` (no resampling).

    With ``user`` (uid, gid) it runs as that user with a desktop's defaults (see
    ``PulseServer``); that needs root and ``setpriv``.
    """
    require_pulse()
    # A short path: a unix socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="as-pulse-"))
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ)
    if user is None:
        env.update(
            PULSE_SERVER=f"unix:{runtime / 'native'}",
            XDG_RUNTIME_DIR=str(runtime),
            PULSE_RUNTIME_PATH=str(runtime / "pulse"),
            PULSE_STATE_PATH=str(root / "state"),
            PULSE_COOKIE=str(root / "cookie"),
            HOME=str(root),
        )
    else:
        require(os.geteuid() == 0, "running PulseAudio as another user needs root")
        require(shutil.which("setpriv") is not None, "setpriv is not installed (util-linux)")
        root.chmod(0o755)  # the desktop user's home: traversable, as /home/USER is
        for path in (root, runtime):
            os.chown(path, *user)
        env = {
            "PATH": env.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "XDG_RUNTIME_DIR": str(runtime),
            "LANG": "C.UTF-8",
        }
    env.pop("DISPLAY", None)
    server = PulseServer(root, rate, channels, env, user=user)
    try:
        server.launch(timeout)
    except BaseException:
        server.stop()
        raise
    return server


# --- speech in, speech out ----------------------------------------------------------


def espeak_wav(path: Path, text: str) -> Path:
    """Speech from espeak-ng as a WAV file at its own rate (22050 Hz mono, int16)."""
    espeak = shutil.which("espeak-ng")
    require(espeak is not None, "espeak-ng is not installed (apt: espeak-ng)")
    assert espeak is not None
    subprocess.run([espeak, "-w", str(path), text], check=True, timeout=30)
    return path


def best_normalised_correlation(reference: np.ndarray, recording: np.ndarray) -> float:
    """Max over lags of the normalised cross-correlation of ``reference`` inside ``recording``."""
    ref = reference.astype(np.float64)
    rec = recording.astype(np.float64)
    if len(rec) < len(ref):
        return 0.0
    n = len(ref) + len(rec)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(rec, size) * np.conj(np.fft.rfft(ref, size)), size)
    lag = int(np.argmax(corr[: len(rec) - len(ref) + 1]))
    window = rec[lag : lag + len(ref)]
    denom = np.linalg.norm(ref) * np.linalg.norm(window)
    return float(np.dot(ref, window) / denom) if denom else 0.0
