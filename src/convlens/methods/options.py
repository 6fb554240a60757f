"""Per-method options given by name: validation against each method's constructor, and parsing
of ``METHOD.OPTION=VALUE`` text (the command line's ``--method-option``) to the option's type.

The options of a method are the keyword arguments of its class's ``__init__``, read from the
signature and the type annotations; nothing here lists them by hand, so a method that gains an
argument gains the option.

Example:
    >>> parse_method_options(["occlusion.patch=16", "occlusion.fill=blur"])
    {'occlusion': {'patch': 16, 'fill': 'blur'}}
    >>> build_methods({"gradcam": {}, "occlusion": {"patch": 16}})
    {'gradcam': <...GradCAM ...>, 'occlusion': <...Occlusion ...>}
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from convlens.errors import InputError, close_matches
from convlens.methods.registry import METHODS, get_method
from convlens.validate import bounds_of, check_bounded

if typing.TYPE_CHECKING:
    from convlens.methods.base import Method

__all__ = [
    "build_methods",
    "check_options",
    "checked_init",
    "method_options",
    "parse_method_options",
    "parse_option_value",
]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


class _Unsupported(TypeError):
    """The option's type cannot be written as text."""


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise InputError(
            f"unknown method {name!r}.{close_matches(name, METHODS)} "
            f"Available: {', '.join(METHODS)}"
        )
    return METHODS[name]


def _parameters(name: str) -> dict[str, tuple[Any, Any]]:
    """``{option: (type hint, default)}`` of the method's constructor."""
    return {
        k: (hint, default)
        for k, (hint, _, default) in _class_parameters(_method_class(name)).items()
    }


def _class_parameters(cls: type) -> dict[str, tuple[Any, Any, Any]]:
    """``{option: (type hint, type hint with its declared bounds, default)}`` of the
    constructor of a method class."""
    init = cls.__init__
    if init is object.__init__:
        return {}
    return _init_parameters(init)


@functools.cache
def _init_parameters(init: Callable[..., None]) -> dict[str, tuple[Any, Any, Any]]:
    params = [
        p
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    init = inspect.unwrap(init)
    try:
        from convlens.methods.base import Method

        module = sys.modules[init.__module__]
        ns = {"globalns": vars(module), "localns": {"Method": Method, "torch": _torch()}}
        hints = typing.get_type_hints(init, **ns)
        extras = typing.get_type_hints(init, include_extras=True, **ns)
    except Exception:  # an annotation that cannot be evaluated: treat the values as text
        hints = extras = {}
    return {p.name: (hints.get(p.name, Any), extras.get(p.name, Any), p.default) for p in params}


def check_options(cls: type, values: Mapping[str, Any], method: str | None = None) -> None:
    """Check option values against the bounds declared on the constructor of a method class
    (``patch: PositiveInt``, see :mod:`convlens.validate`); options without bounds and unknown
    names are left to the constructor.

    Args:
        cls: the method class.
        values: ``{option: value}``.
        method: the method's name in messages (default ``cls.name``).

    Raises:
        InputError: a value outside its declared bound, e.g. ``"occlusion.patch must be a
            positive integer, got 0"``.
    """
    _check(_class_parameters(cls), values, method or getattr(cls, "name", "") or cls.__name__)


def _check(
    params: Mapping[str, tuple[Any, Any, Any]], values: Mapping[str, Any], name: str
) -> None:
    for option, value in values.items():
        if option in params:
            check_bounded(value, params[option][1], f"{name}.{option}")


def checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a method class's ``__init__`` so that its arguments are checked against their
    declared bounds (:func:`check_options`) before it runs: ``Occlusion(patch=0)`` fails like
    ``-o occlusion.patch=0``. :class:`~convlens.methods.base.Method` applies it to every
    subclass that defines ``__init__``."""
    if getattr(init, "_checks_bounds", False):
        return init

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = inspect.signature(init).bind(self, *args, **kwargs)
        except TypeError:
            bound = None  # the constructor itself reports wrong arguments
        if bound is not None:
            values = dict(list(bound.arguments.items())[1:])
            _check(_init_parameters(init), values, getattr(self, "name", "") or type(self).__name__)
        init(self, *args, **kwargs)

    __init__._checks_bounds = True  # type: ignore[attr-defined]
    return __init__


def _torch() -> types.ModuleType:
    import torch

    return torch


def _describe(hint: Any) -> str:
    if hint is Any:
        return "any"
    if get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def method_options(name: str) -> dict[str, str]:
    """The options of a registered method: ``{option: "type (default ...)"}``.

    Raises:
        InputError: unknown method (close matches listed).
    """
    out = {}
    for opt, (hint, extras, default) in _class_parameters(_method_class(name)).items():
        bounds = bounds_of(extras)
        allowed = f", {bounds[0].describe()}" if bounds else ""
        out[opt] = f"{_describe(hint)} (default {default!r}){allowed}"
    return out


def parse_option_value(text: str, hint: Any) -> Any:
    """Convert command-line text to a value of the type ``hint``.

    Handles ``bool`` (true/false, yes/no, on/off, 1/0), ``int``, ``float``, ``str``,
    ``Literal[...]``, ``None`` (``none``), unions of these (tried in order, ``Literal`` members
    first) and ``tuple``/``list`` of them (comma-separated).

    Raises:
        ValueError: the text is not a value of that type.
        TypeError: values of that type cannot be written as text.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    if hint is type(None):
        if text.strip().lower() in _NONE:
            return None
        raise ValueError(f"expected none, got {text!r}")
    if origin is Literal:
        for a in args:
            if str(a) == text.strip():
                return a
        raise ValueError(f"expected one of {', '.join(repr(a) for a in args)}, got {text!r}")
    if origin in (Union, types.UnionType):
        ordered = sorted(args, key=lambda a: (a is not type(None), get_origin(a) is not Literal))
        for a in ordered:
            try:
                return parse_option_value(text, a)
            except (ValueError, _Unsupported):
                continue
        raise ValueError(f"expected {_describe(hint)}, got {text!r}")
    if hint is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError(f"expected true or false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if hint is str:
        return text
    if origin in (tuple, list) and args:
        item = args[0]
        values = [parse_option_value(t.strip(), item) for t in text.split(",") if t.strip()]
        return tuple(values) if origin is tuple else values
    raise _Unsupported(f"a {_describe(hint)} cannot be given as text")


def parse_method_options(specs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Parse ``METHOD.OPTION=VALUE`` strings into ``{method: {option: value}}``.

    Each value is converted to the type of the option in the method's constructor (see
    :func:`parse_option_value`). A later setting of the same option wins.

    Args:
        specs: e.g. ``["occlusion.patch=16", "occlusion.stride=8"]``.

    Returns:
        The options per method, values typed.

    Raises:
        InputError: malformed text, unknown method or option (the valid ones are listed), or
            a value of the wrong type.
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        key, eq, text = spec.partition("=")
        method, dot, option = key.strip().partition(".")
        if not eq or not dot or not method or not option:
            raise InputError(
                f"method option {spec!r} must look like METHOD.OPTION=VALUE, "
                "e.g. occlusion.patch=16"
            )
        params = _known_options(method, [option])
        try:
            value = parse_option_value(text.strip(), params[option][0])
        except _Unsupported:
            raise InputError(
                f"option {option!r} of {method} cannot be set from text "
                f"({method_options(method)[option]}); use the Python API"
            ) from None
        except ValueError as exc:
            raise InputError(f"method option {spec!r}: {exc}") from None
        check_options(_method_class(method), {option: value}, method)
        out.setdefault(method, {})[option] = value
    return out


def _known_options(method: str, options: Iterable[str]) -> dict[str, tuple[Any, Any]]:
    params = _parameters(method)
    for option in options:
        if option not in params:
            valid = ", ".join(f"{k}: {v}" for k, v in method_options(method).items())
            raise InputError(
                f"{method} has no option {option!r}.{close_matches(option, params)} "
                + (f"Its options: {valid}" if valid else f"{method} takes no options.")
            )
    return params


def build_methods(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, Method]:
    """Instances of the named methods, configured with their options, checked up front.

    Args:
        methods: ``{method name: {option: value}}``; values are used as given.

    Returns:
        ``{method name: Method}`` in the given order.

    Raises:
        InputError: unknown method or option (the valid ones are listed), or a value the
            method rejects.
    """
    out: dict[str, Method] = {}
    for name, options in methods.items():
        _known_options(name, options)
        try:
            out[name] = get_method(name, **dict(options))
        except (ValueError, TypeError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{name} options {dict(options)!r}: {exc}") from None
    return out
