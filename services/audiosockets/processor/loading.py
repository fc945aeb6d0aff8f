"""Handler specs: parsing ``--handler`` values and loading what they name.

A spec is one of: a built-in name (``level``, ``vad[:k=v,...]``, ``archive:DIR``,
``spectrum``), ``package.module:callable`` or ``path/to/file.py:callable``.
Everything here raises ``HandlerError`` with one line a user can act on; nothing
here touches the event loop, so worker processes load handlers with the same code.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ..errors import HandlerError
from ..handlers import BUILTINS, HandlerContext, HandlerOptions, MetricSink, builtin_class

LOG_INTERVAL: Final = 10.0
SPEC_HELP: Final = (
    "a built-in (level, vad, archive:DIR, spectrum), package.module:callable "
    "or path/to/file.py:callable"
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# --- handler specs -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A parsed ``--handler`` value; picklable, so workers can load it themselves."""

    text: str
    kind: Literal["builtin", "module", "file"]
    target: str  # built-in name, module name or file path
    attr: str | None = None  # the callable or class inside the module/file
    arg: str | None = None  # built-in argument (archive:DIR, vad:key=value)

    @property
    def name(self) -> str:
        """Low-cardinality label for metrics: never a directory path."""
        if self.kind == "builtin":
            return self.target
        if self.kind == "file":
            return f"{Path(self.target).name}:{self.attr}"
        return f"{self.target}:{self.attr}"

    @property
    def stateful(self) -> bool:
        """Built-ins that keep state across chunks must see every chunk of a stream in order."""
        return self.kind == "builtin" and BUILTINS[self.target].stateful


def parse_spec(text: str) -> HandlerSpec:
    """Parse a handler spec; a malformed one is a ``HandlerError`` in one line."""
    text = text.strip()
    if not text:
        raise HandlerError(f"--handler is empty: expected {SPEC_HELP}")
    head, sep, tail = text.partition(":")
    if head in BUILTINS:
        takes = BUILTINS[head].takes_arg
        if takes == "required" and not tail:
            raise HandlerError(f"handler {head} needs an argument: {head}:DIR")
        if takes == "none" and sep:
            raise HandlerError(f"handler {head} takes no argument, got {text!r}")
        return HandlerSpec(text, "builtin", head, None, tail or None)
    left, sep, attr = text.rpartition(":")
    if not sep:
        raise HandlerError(f"unknown handler {text!r}: expected {SPEC_HELP}")
    if not _IDENT.match(attr):
        raise HandlerError(f"handler {text!r}: {attr!r} is not a Python name")
    if left.endswith(".py") or "/" in left or os.sep in left:
        return HandlerSpec(text, "file", left, attr)
    if not _IDENT.match(left):
        raise HandlerError(f"handler {text!r}: {left!r} is not a module name; expected {SPEC_HELP}")
    return HandlerSpec(text, "module", left, attr)


def _import_file(path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise HandlerError(f"handler file {path_text} does not exist")
    module_name = "_audiosockets_user_" + re.sub(r"\W", "_", str(path.resolve()))
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerError(f"handler file {path_text} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look modules up here
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)  # like running a script: its sibling modules import
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise HandlerError(f"handler file {path_text} failed to import: {_one_line(exc)}") from exc
    return module


def load_target(spec: HandlerSpec) -> Any:
    """Import what the spec names: a class, a function or an object with ``handle``."""
    if spec.kind == "builtin":
        return builtin_class(spec.target)
    if spec.kind == "file":
        module = _import_file(spec.target)
        where = spec.target
    else:
        try:
            module = importlib.import_module(spec.target)
        except ModuleNotFoundError as exc:
            raise HandlerError(
                f"handler module {spec.target} not found ({exc.name} is missing)"
            ) from exc
        except Exception as exc:
            raise HandlerError(
                f"handler module {spec.target} failed to import: {_one_line(exc)}"
            ) from exc
        where = spec.target
    obj: Any = module
    for part in (spec.attr or "").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(
                f"handler {spec.text!r}: {where} has no attribute {spec.attr!r}"
            ) from None
    if inspect.isclass(obj):
        if not callable(getattr(obj, "handle", None)):
            raise HandlerError(
                f"handler {spec.text!r}: class {obj.__name__} has no handle(chunk) method"
            )
    elif not callable(obj) and not callable(getattr(obj, "handle", None)):
        raise HandlerError(
            f"handler {spec.text!r} is neither callable nor has a handle(chunk) method"
        )
    return obj


def check_handler(spec: HandlerSpec, options: HandlerOptions) -> Any:
    """Load the spec and, for a built-in, build one instance to validate its argument.

    Returns the loaded target. Called before connecting, so a bad spec, option
    or archive directory is one error line at startup, not a counted failure.
    """
    target = load_target(spec)
    if spec.kind == "builtin":
        target(HandlerContext("", spec.arg, options, MetricSink()))
    return target


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
