"""Why audio capture cannot start: the cause in one clause, found by looking, not guessing.

PortAudio reports every failure to reach audio the same way ("no default input
device", "device unavailable"), whether the sound server's socket is missing, the
server refused us, the card is held by another program or there is no card at all.
When the recorder (or ``audiosockets devices``) finds no usable input, it asks
``diagnose_capture()``, which checks, in order:

1. **A sound server** (PulseAudio or PipeWire's pulse server), when one is meant to
   be used: ``PULSE_SERVER`` is set, or ALSA's default device is the ``pulse``
   plugin (``/etc/asound.conf``, as in the PulseAudio recorder image). Its socket
   must exist, be a socket (Docker makes an empty *directory* at a bind-mount
   source that did not exist), accept a connection, and admit us (asked through
   libpulse-simple when it is installed: "Access denied" is an authentication
   refusal).
2. **ALSA devices** otherwise: ``/dev/snd`` must exist, hold a capture node
   (``pcmC*D*c``), be ours to open, and not be busy (``EBUSY`` from ``open``).

Each check only reads, connects or opens-and-closes; nothing is left open. The
result is None when every check passes (the cause is elsewhere, and the
caller keeps PortAudio's own words).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .errors import DeviceError

ASOUND_CONF: Final = Path("/etc/asound.conf")
DEV_SND: Final = Path("/dev/snd")


# --- the sound server ----------------------------------------------------------------


def pulse_socket(env: Mapping[str, str], asound_conf: Path = ASOUND_CONF) -> Path | None:
    """The sound server socket capture would go through, or None when none is meant.

    ``PULSE_SERVER`` (``unix:PATH`` or ``PATH``) wins; without it, an ALSA default
    of ``type pulse`` means libpulse's default, ``$XDG_RUNTIME_DIR/pulse/native``
    (``/run/user/UID/pulse/native`` when unset). A TCP server (``tcp:HOST``) is
    not checked here: None.
    """
    server = env.get("PULSE_SERVER", "").strip()
    if server:
        # A list of servers is tried in order; the first is the one meant.
        first = server.split()[0]
        if first.startswith("unix:"):
            return Path(first.removeprefix("unix:"))
        return Path(first) if first.startswith("/") else None
    try:
        conf = asound_conf.read_text(errors="replace")
    except OSError:
        return None
    if "type pulse" not in conf:
        return None
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Path(runtime) / "pulse" / "native"


def diagnose_sound_server(path: Path) -> str | None:
    """Why the sound server at the unix socket ``path`` cannot be used, or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"sound server socket missing at {path} (is PulseAudio/PipeWire running there?)"
    except PermissionError:
        return f"no permission to reach the sound server socket {path}"
    if stat.S_ISDIR(mode):
        return (
            f"{path} is a directory, not the sound server's socket (Docker creates one "
            "when a bind-mounted socket does not exist on the host: check PULSE_SOCKET)"
        )
    if not stat.S_ISSOCK(mode):
        return f"{path} is not a socket, so no sound server listens there"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            return f"nothing listens on the sound server socket {path} (the server is not running)"
        except PermissionError:
            return (
                f"no permission to connect to the sound server socket {path} "
                "(run the recorder as the sound server's user)"
            )
        except OSError as err:
            return f"cannot connect to the sound server socket {path}: {err.strerror or err}"
    refusal = _pulse_refusal(path)
    if refusal is None:
        return None
    if refusal == "Access denied":
        return (
            f"authentication refused by the sound server at {path} (PulseAudio admits "
            "clients of its own uid or with its cookie: run the recorder as the desktop "
            "user, PULSE_UID/PULSE_GID)"
        )
    return f"the sound server at {path} refused a recording stream: {refusal}"


class _SampleSpec(ctypes.Structure):
    _fields_ = (("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8))


_PA_STREAM_RECORD: Final = 2
_PA_SAMPLE_S16LE: Final = 3


def _pulse_refusal(path: Path) -> str | None:
    """libpulse's own error for opening a short-lived record stream; None if it opens.

    Also None when libpulse-simple is not installed: nothing more can be learnt.
    """
    name = ctypes.util.find_library("pulse-simple")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.pa_simple_new.restype = ctypes.c_void_p
    lib.pa_simple_new.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
        ctypes.POINTER(_SampleSpec), ctypes.c_void_p, ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int),
    ]  # fmt: skip
    lib.pa_simple_free.argtypes = [ctypes.c_void_p]
    lib.pa_strerror.restype = ctypes.c_char_p
    lib.pa_strerror.argtypes = [ctypes.c_int]
    spec = _SampleSpec(_PA_SAMPLE_S16LE, 16000, 1)
    error = ctypes.c_int(0)
    handle = lib.pa_simple_new(
        f"unix:{path}".encode(), b"audiosockets", _PA_STREAM_RECORD, None,
        b"diagnosis", ctypes.byref(spec), None, None, ctypes.byref(error),
    )  # fmt: skip
    if handle:
        lib.pa_simple_free(handle)
        return None
    text = lib.pa_strerror(error.value)
    return text.decode(errors="replace") if text else f"error {error.value}"


# --- ALSA devices ---------------------------------------------------------------------


def diagnose_alsa(dev_snd: Path = DEV_SND) -> str | None:
    """Why no ALSA capture device under ``dev_snd`` can be opened, or None."""
    if not dev_snd.is_dir():
        return (
            f"no sound card: {dev_snd} does not exist here (give the container the "
            "host's /dev/snd, or record through the host's sound server)"
        )
    captures = sorted(p for p in dev_snd.glob("pcmC*D*c"))
    if not captures:
        return f"no capture device: {dev_snd} holds no pcmC*D*c node (no microphone input)"
    busy = []
    for node in captures:
        try:
            fd = os.open(node, os.O_RDWR | os.O_NONBLOCK)
        except PermissionError:
            return (
                f"no permission to open {node} (uid {os.getuid()} is not in its group "
                f"{node.stat().st_gid}: add that group id, AUDIO_GID)"
            )
        except OSError as err:
            if err.errno == errno.EBUSY:
                busy.append(node)
                continue
            return f"cannot open {node}: {err.strerror or err}"
        os.close(fd)
        return None  # one capture device opens: the cause is not here
    names = ", ".join(str(n) for n in busy)
    return (
        f"device busy: {names} held by another program (a desktop's PulseAudio or "
        "PipeWire owns the card: record through its socket instead)"
    )


def diagnose_capture(
    env: Mapping[str, str] | None = None,
    *,
    asound_conf: Path = ASOUND_CONF,
    dev_snd: Path = DEV_SND,
) -> str | None:
    """The cause of "no audio input" on this machine as one clause, or None if none found."""
    env = os.environ if env is None else env
    server = pulse_socket(env, asound_conf)
    if server is not None:
        return diagnose_sound_server(server)
    return diagnose_alsa(dev_snd)


def describe_input_devices() -> list[str]:
    """Lines for ``audiosockets devices``: one per input device, ``*`` marks the default.

    Raises ``DeviceError`` (one sentence with the cause, when it can be found) on a
    machine without input devices: a script or a container check can test the
    exit status.
    """
    from .sources import list_input_devices

    devices, default = list_input_devices()
    if not devices:
        raise explain_capture_failure(
            DeviceError(
                "no audio input devices found: PortAudio sees no sound card or sound server "
                "(use --source synth:sine or file:PATH to record without one)"
            )
        )
    lines = [f"  {'index':>5}  {'name':<40} {'channels':>8} {'default rate':>12}"]
    for dev in devices:
        mark = "*" if dev.get("index") == default else " "
        rate = f"{float(dev['default_samplerate']):.0f} Hz"
        lines.append(
            f"{mark} {dev['index']:>5}  {str(dev['name'])[:40]:<40} "
            f"{dev['max_input_channels']:>8} {rate:>12}"
        )
    return lines


def explain_capture_failure(err: DeviceError) -> DeviceError:
    """``err`` plus the cause found on this machine (audio_diagnose), if one is found.

    Not for a PortAudio library that failed to load (an ``OSError`` cause): that
    message already says what to install.
    """
    if isinstance(err.__cause__, OSError):
        return err
    cause = diagnose_capture()
    if cause is None:
        return err
    return DeviceError(f"{err}; cause: {cause}")
