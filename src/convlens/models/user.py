"""Loading a user's own network: a factory in a file or package, a TorchScript file, weights.

Specifications understood by :func:`load_user_network`:

* ``"path/to/net.py:build"`` -- import the file, call ``build()``;
* ``"package.module:build"`` -- import the module, call ``build()``;
* ``"model.pt"`` (also ``.pth``, ``.ts``, ``.torchscript``) -- a TorchScript file saved with
  ``torch.jit.save``.

A state dict (``torch.save(net.state_dict(), "w.pt")``) is not a model: it holds the numbers
but not the code, so it is given as ``weights`` together with a factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

from convlens.errors import ModelLoadError, close_matches
from convlens.models.builtin import BUILTIN_MODELS
from convlens.userfiles import require_file

__all__ = [
    "TORCHSCRIPT_SUFFIXES",
    "load_user_network",
    "load_weights",
    "torchscript_deprecation_silenced",
]

TORCHSCRIPT_SUFFIXES: frozenset[str] = frozenset({".pt", ".pth", ".ts", ".torchscript"})
"""Extensions of files taken as TorchScript models when no ``:factory`` is given."""

_TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"
"""torch's own warning on each TorchScript call (``torch.jit.load``, ``save``, ``script``,
``trace``): a ``DeprecationWarning`` since torch 2.10, a ``FutureWarning`` since 2.14."""


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """Silence, inside the block only, torch's deprecation warning on TorchScript calls.

    TorchScript files are a supported model format; torch >= 2.10 warns on every
    ``torch.jit`` call. Only that message, as a ``DeprecationWarning`` or ``FutureWarning``, is
    silenced; every other warning (e.g. TorchScript "may break" on Python 3.14) still shows.
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATED, category=category)
        yield


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_SHOWN = 3  # keys listed per kind of mismatch


def load_user_network(spec: str, *, weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """Build or load a user's network from a specification string.

    Args:
        spec: ``"path/to/net.py:factory"``, ``"package.module:factory"`` (the factory is called
            with no arguments and must return an ``nn.Module``; it may be a class or a dotted
            attribute such as ``Nets.small``), or the path of a TorchScript file.
        weights: optional state-dict file (``torch.save(net.state_dict(), path)``), also accepted
            wrapped in a checkpoint dict under ``"state_dict"``, ``"model"`` or
            ``"model_state_dict"``, or a ``.safetensors`` file; a ``module.`` prefix
            (DataParallel) or ``_orig_mod.`` prefix (``torch.compile``) on every key is removed.
            Loaded with ``weights_only=True`` on the CPU and ``strict=True``.

    Returns:
        ``(network, name)``: the network in eval mode, on the CPU unless the factory put it
        elsewhere, and a short name for reports (``"net:build"``, ``"pkg.mod:build"`` or the
        TorchScript file's stem).

    Raises:
        ModelLoadError: the file or module is missing or fails to import, the factory is missing,
            raises or returns something other than an ``nn.Module``, the file is not TorchScript
            (e.g. a state dict given as the model), or the weights do not fit the network.
    """
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("empty model specification; give 'net.py:build' or a TorchScript file")
    if Path(spec).suffix.lower() in TORCHSCRIPT_SUFFIXES:
        net, name = _load_torchscript(Path(spec).expanduser()), Path(spec).stem
    elif ":" in spec:
        target, factory = spec.rsplit(":", 1)
        if not factory or not target:
            raise ModelLoadError(
                f"model {spec!r}: expected 'path/to/net.py:factory' or 'package.module:factory'"
            )
        if _looks_like_file(target):
            path = Path(target).expanduser()
            name = f"{path.stem}:{factory}"
            # The file may import modules next to it, at import time or inside the factory.
            with _on_sys_path(path.absolute().parent):
                net = _call_factory(_import_file(path), factory, name)
        else:
            name = f"{target}:{factory}"
            net = _call_factory(_import_module(target), factory, name)
    elif spec.endswith(".py"):
        raise ModelLoadError(
            f"model {spec!r} names a Python file but no factory; "
            f"write it as '{spec}:build' where build() returns the network"
        )
    else:
        raise ModelLoadError(f"unknown model {spec!r}.{_builtin_hint(spec)} {_SPEC_HELP}")
    if weights is not None:
        load_weights(net, Path(weights).expanduser(), name)
    net.eval()
    return net, name


_SPEC_HELP = (
    "Give a built-in model name, a factory 'path/to/net.py:build' or 'package.module:build', "
    "or a TorchScript file (.pt)."
)


def _builtin_hint(spec: str) -> str:
    return close_matches(spec, BUILTIN_MODELS)


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target or Path(target).is_file()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Let a model file import its sibling modules while it is imported and built."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            with suppress(ValueError):  # the user's code may have removed it already
                sys.path.remove(entry)


def _import_file(path: Path) -> ModuleType:
    require_file(path, "model file", error=ModelLoadError)
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_convlens_user_{stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered so that dataclasses, pickling and TorchScript can find the module by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, SyntaxError):
            raise ModelLoadError(
                f"syntax error in '{exc.filename or path}' line {exc.lineno}: {exc.msg}"
            ) from exc
        if isinstance(exc, SystemExit):
            raise ModelLoadError(
                f"importing '{path}' called sys.exit(); "
                'put script code under `if __name__ == "__main__":`'
            ) from exc
        if isinstance(exc, Exception):
            raise ModelLoadError(f"importing '{path}' failed: {_one_line(exc)}") from exc
        raise
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"cannot import module {name!r}: {_one_line(exc)} "
            "(for a file, write its path: 'path/to/net.py:build')"
        ) from exc
    except SyntaxError as exc:
        raise ModelLoadError(
            f"syntax error in module {name!r} ({exc.filename} line {exc.lineno}): {exc.msg}"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"importing module {name!r} failed: {_one_line(exc)}") from exc


def _call_factory(module: ModuleType, factory: str, name: str) -> nn.Module:
    where = getattr(module, "__file__", None) or module.__name__
    obj: Any = module
    for part in factory.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if obj is None or not callable(obj):
        choices = [
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and not isinstance(v, ModuleType)
        ]
        raise ModelLoadError(
            f"'{where}' has no function {factory!r}.{close_matches(factory, choices)}"
        )
    fn: Callable[[], Any] = obj
    try:
        net = fn()
    except SystemExit as exc:
        raise ModelLoadError(f"calling {name}() called sys.exit()") from exc
    except Exception as exc:
        raise ModelLoadError(f"calling {name}() failed: {_one_line(exc)}") from exc
    if not isinstance(net, nn.Module):
        raise ModelLoadError(
            f"{name}() returned {type(net).__name__}, not a torch.nn.Module; "
            "the factory must return the network"
        )
    return net


def _load_torchscript(path: Path) -> nn.Module:
    require_file(path, "model file", error=ModelLoadError)
    try:
        with torchscript_deprecation_silenced():  # loading a TorchScript file is supported
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        jit_error = exc
    # Not TorchScript. Say what it is when that is cheap to find out.
    kind = _sniff_checkpoint(path)
    if kind == "state_dict":
        raise ModelLoadError(
            f"'{path}' is a state dict, not a TorchScript model; a state dict needs the code that "
            f"builds the network: --model net.py:build --weights {path}"
        ) from jit_error
    if kind == "pickled":
        raise ModelLoadError(
            f"'{path}' is a pickled Python object (torch.save(model)?), not a TorchScript model; "
            f"save the state dict and give its factory (--model net.py:build --weights {path}), "
            "or save with torch.jit.save(torch.jit.script(model), path)"
        ) from jit_error
    raise ModelLoadError(
        f"cannot load '{path}' as a TorchScript model ({_one_line(jit_error)})"
    ) from jit_error


def _torch_load(path: Path) -> object:
    """``torch.load`` of tensors only, on the CPU, without torch's TorchScript-archive warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*looks like a TorchScript archive")
        return torch.load(path, map_location="cpu", weights_only=True)


def _needs_unsafe_unpickling(exc: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a valid pickle of Python objects."""
    return isinstance(exc, pickle.UnpicklingError) and "unsupported global" in str(exc).lower()


def _sniff_checkpoint(path: Path) -> str:
    """``"state_dict"``, ``"pickled"`` (needs unsafe unpickling) or ``"unknown"``."""
    try:
        obj = _torch_load(path)
    except Exception as exc:
        return "pickled" if _needs_unsafe_unpickling(exc) else "unknown"
    return "state_dict" if _find_state_dict(obj) is not None else "unknown"


def _find_state_dict(obj: object) -> Mapping[str, Any] | None:
    """The state dict in a loaded file: the object itself or one wrapped in a checkpoint dict."""
    if _is_state_dict(obj):
        return cast("Mapping[str, Any]", obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return cast("Mapping[str, Any]", obj[key])
    return None


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefixes(state: Mapping[str, Any], expected: Iterable[str]) -> dict[str, Any]:
    """Remove a wrapper's prefix carried by every key, unless the network's keys have it too."""
    out = dict(state)
    expected = list(expected)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out) and not (
                expected and all(k.startswith(prefix) for k in expected)
            ):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def load_weights(net: nn.Module, path: Path, name: str) -> None:
    """Load a state-dict file into ``net``, strictly (every key, every shape).

    Args:
        net: the network the weights are for.
        path: ``torch.save(net.state_dict(), path)`` (also wrapped in a checkpoint dict under
            ``"state_dict"``, ``"model"`` or ``"model_state_dict"``), read with
            ``weights_only=True``; or a ``.safetensors`` file (needs the ``safetensors``
            package). A ``module.`` or ``_orig_mod.`` prefix on every key is removed.
        name: the model's name, for messages.

    Raises:
        ModelLoadError: the file is missing or unreadable, holds no state dict, or its keys or
            shapes do not fit the network (the message lists the first mismatches).
    """
    require_file(path, "weights file", error=ModelLoadError)
    obj = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_pickle(path)
    found = _find_state_dict(obj)
    if found is None:
        if isinstance(obj, Mapping):
            what = f"a dict with keys {', '.join(map(repr, list(obj)[:_SHOWN]))}"
        else:
            what = f"a {type(obj).__name__}"
        raise ModelLoadError(
            f"weights file '{path}' holds {what}, not a state dict; "
            "save the weights with torch.save(net.state_dict(), path)"
        )
    state = _strip_prefixes(found, net.state_dict())
    problems = _mismatches(net, state)
    if problems:
        raise ModelLoadError(f"weights '{path}' do not fit {name}: {'; '.join(problems)}")
    try:
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"weights '{path}' do not fit {name}: {_one_line(exc)}") from exc


def _mismatches(net: nn.Module, state: Mapping[str, Any]) -> list[str]:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {_shape(state[k])}, model {_shape(v)})"
        for k, v in expected.items()
        if k in state
        and isinstance(v, torch.Tensor)
        and isinstance(state[k], torch.Tensor)
        and state[k].shape != v.shape
    ]
    problems = []
    for label, keys in (
        ("missing key", missing),
        ("unexpected key", unexpected),
        ("shape mismatch", shapes),
    ):
        if keys:
            shown = ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")
            plural = "es" if label.endswith("mismatch") else "s"
            problems.append(f"{len(keys)} {label}{plural if len(keys) > 1 else ''} ({shown})")
    return problems


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _read_pickle(path: Path) -> object:
    try:
        return _torch_load(path)
    except Exception as exc:
        if _needs_unsafe_unpickling(exc):
            raise ModelLoadError(
                f"weights file '{path}' holds Python objects, not just tensors (a pickled "
                "model?); save the weights with torch.save(net.state_dict(), path)"
            ) from exc
        if "TorchScript" in str(exc):
            raise ModelLoadError(
                f"weights file '{path}' is a TorchScript model, not a state dict; "
                f"give it as the model instead: --model {path}"
            ) from exc
        raise ModelLoadError(f"cannot read weights file '{path}': {_one_line(exc)}") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModelLoadError(
            f"weights file '{path}' is a safetensors file; reading it needs the safetensors "
            "package: pip install safetensors (or pip install convlens[zoo])"
        ) from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read weights file '{path}' as safetensors: {_one_line(exc)}"
        ) from exc
