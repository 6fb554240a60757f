"""One validation layer for the numbers and devices a user gives, shared by the command line and
the Python API.

Each check takes the value and the name to show (``"batch_size"`` from the API, ``"--batch-size"``
from the command line), returns the value converted to its type, and raises
:class:`~convlens.errors.InputError` naming the option and what is allowed. Floats must be
finite: NaN fails every comparison, so a NaN slips through checks like ``lr <= 0`` unless it is
rejected first.

Bounds can also be declared on a parameter's type, ``patch: PositiveInt = 32``: the
:class:`Bound` is then read from the annotation (:func:`bounds_of`) by
:mod:`convlens.methods.options`, which checks a method's options with it whether they come from
``Occlusion(patch=0)`` or from ``-o occlusion.patch=0``, and lists it in
``convlens methods --options``.

Example:
    >>> positive_int(16, "batch_size")
    16
    >>> positive_int(0, "--batch-size")
    Traceback (most recent call last):
    convlens.errors.InputError: --batch-size must be a positive integer, got 0
"""

from __future__ import annotations

import math
import numbers
import re
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from convlens.errors import InputError, NonFiniteError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_CHOICES",
    "Bound",
    "FiniteFloat",
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Seed",
    "at_least",
    "bounds_of",
    "check_bounded",
    "check_finite_inputs",
    "finite_float",
    "finite_floats",
    "fraction",
    "in_range",
    "int_text",
    "listed",
    "non_negative_float",
    "non_negative_int",
    "nonfinite_outputs",
    "parse_device",
    "positive_float",
    "positive_int",
    "seed",
]


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def int_text(text: str) -> int | None:
    """The integer that ``text`` spells in ASCII digits (``"281"``, ``" -1 "``), else ``None``.

    The one reading of "is this text a number?" for class, target, channel and layer-call text:
    ``str.isdigit`` accepts characters ``int()`` rejects (``"²"``) and ``int()`` accepts other
    scripts' digits; both would make a name look like an index or an index fail as a name.
    """
    stripped = text.strip()
    return int(stripped) if _INT_TEXT.fullmatch(stripped) else None


@dataclass(frozen=True)
class Bound:
    """The values a numeric option allows: an integer or a finite float, optionally at least
    ``low`` and at most ``high`` (``low_open`` / ``high_open`` exclude the bound itself)."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """What the bound allows, in words (``"a positive integer"``, ``"a number in [0, 1]"``)."""
        kind = "an integer" if self.integer else "a number"
        lo, hi = self.low, self.high
        if hi is None and lo == 0 and self.low_open:
            return "a positive integer" if self.integer else "a positive number"
        if hi is None and lo == 1 and self.integer and not self.low_open:
            return "a positive integer"
        if lo is not None and hi is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{kind} {'<' if self.high_open else '<='} {_num(hi)}"
        return "an integer" if self.integer else "a finite number"

    def check(self, value: object, name: str) -> Any:
        """``value`` as an ``int`` (integer bounds) or ``float``, if the bound allows it.

        Raises:
            InputError: not a number of the right kind, not finite, or out of bounds.
        """
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError(f"{name} must be {self.describe()}, got {value!r}")
        if self.integer:
            if not isinstance(value, numbers.Integral):
                raise InputError(f"{name} must be {self.describe()}, got {value!r}")
            number: float = int(value)
        else:
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if not math.isfinite(number):
                raise InputError(f"{name} must be {self.describe()}, got {value!r}")
        lo, hi = self.low, self.high
        if (lo is not None and (number < lo or (self.low_open and number == lo))) or (
            hi is not None and (number > hi or (self.high_open and number == hi))
        ):
            raise InputError(f"{name} must be {self.describe()}, got {value!r}")
        return number


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


#: What ``torch.Generator.manual_seed`` takes.
SEED = Bound(integer=True, low=-(2**63), high=2**64 - 1)
POSITIVE_INT = Bound(integer=True, low=1)
NON_NEGATIVE_INT = Bound(integer=True, low=0)
POSITIVE = Bound(low=0, low_open=True)
NON_NEGATIVE = Bound(low=0)
FINITE = Bound()
FRACTION = Bound(low=0, high=1)

#: ``int``, at least 1 (declared on a parameter: checked by the method options).
PositiveInt = Annotated[int, POSITIVE_INT]
#: ``int``, at least 0.
NonNegativeInt = Annotated[int, NON_NEGATIVE_INT]
#: finite ``float`` above 0.
PositiveFloat = Annotated[float, POSITIVE]
#: finite ``float``, at least 0.
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
#: finite ``float``.
FiniteFloat = Annotated[float, FINITE]
#: ``float`` in [0, 1].
Fraction = Annotated[float, FRACTION]
#: ``int`` that a random generator can be seeded with.
Seed = Annotated[int, SEED]


def positive_int(value: object, name: str) -> int:
    """``value`` if it is an integer >= 1.

    Raises:
        InputError: not an integer, or below 1 (the message names ``name``).
    """
    return int(POSITIVE_INT.check(value, name))


def seed(value: object, name: str) -> int:
    """``value`` if it is an integer a random generator can be seeded with
    (``torch.Generator.manual_seed``: -2**63 to 2**64 - 1).

    Raises:
        InputError: not an integer, or out of that range.
    """
    return int(SEED.check(value, name))


def non_negative_int(value: object, name: str) -> int:
    """``value`` if it is an integer >= 0.

    Raises:
        InputError: not an integer, or negative.
    """
    return int(NON_NEGATIVE_INT.check(value, name))


def positive_float(value: object, name: str) -> float:
    """``value`` as a float if it is finite and > 0.

    Raises:
        InputError: not a number, NaN, infinite, or not above 0.
    """
    return float(POSITIVE.check(value, name))


def non_negative_float(value: object, name: str) -> float:
    """``value`` as a float if it is finite and >= 0.

    Raises:
        InputError: not a number, NaN, infinite, or negative.
    """
    return float(NON_NEGATIVE.check(value, name))


def finite_float(value: object, name: str) -> float:
    """``value`` as a float if it is finite.

    Raises:
        InputError: not a number, NaN or infinite.
    """
    return float(FINITE.check(value, name))


def fraction(value: object, name: str) -> float:
    """``value`` as a float if it is in [0, 1].

    Raises:
        InputError: not a number, NaN, or outside [0, 1].
    """
    return float(FRACTION.check(value, name))


def at_least(value: object, name: str, low: float) -> float:
    """``value`` as a float if it is finite and >= ``low``.

    Raises:
        InputError: not a number, NaN, infinite, or below ``low``.
    """
    return float(Bound(low=low).check(value, name))


def in_range(value: object, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float if it is in [low, high] (``(low, high]`` with ``low_open``).

    Raises:
        InputError: not a number, NaN, or outside the range.
    """
    return float(Bound(low=low, high=high, low_open=low_open).check(value, name))


def finite_floats(
    values: Iterable[object], name: str, *, count: int | None = None, positive: bool = False
) -> tuple[float, ...]:
    """``values`` as a tuple of finite floats (``count`` of them, each > 0 with ``positive``).

    Raises:
        InputError: not a sequence of numbers, the wrong count, or a value NaN, infinite or
            (with ``positive``) not above 0.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{name} must be a sequence of numbers, got {values!r}")
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    out = tuple(values)
    if count is not None and len(out) != count:
        raise InputError(f"{name} must have {count} values, got {len(out)}: {out!r}")
    bound = POSITIVE if positive else FINITE
    try:
        return tuple(float(bound.check(v, name)) for v in out)
    except InputError:
        kind = "positive finite numbers" if positive else "finite numbers"
        raise InputError(f"{name} must be {kind}, got {out!r}") from None


# ------------------------------------------------------------------------- declared bounds


def bounds_of(hint: Any) -> list[Bound]:
    """The :class:`Bound` objects declared in a type hint (``Annotated[int, Bound]``, also
    inside ``X | None`` and as the item type of ``tuple[...]`` / ``list[...]``)."""
    if get_origin(hint) is Annotated:
        return [m for m in hint.__metadata__ if isinstance(m, Bound)]
    if get_origin(hint) in (Union, types.UnionType, tuple, list):
        return [b for a in get_args(hint) if a is not Ellipsis for b in bounds_of(a)]
    return []


def check_bounded(value: object, hint: Any, name: str) -> None:
    """Check ``value`` against the bounds declared in ``hint`` (see :func:`bounds_of`).

    ``None``, strings (the choices of a ``Literal`` beside a number) and values of other types
    are left to the code that uses them; sequences are checked item by item.

    Raises:
        InputError: a number outside the declared bound.
    """
    bounds = bounds_of(hint)
    if not bounds or value is None or isinstance(value, str):
        return
    if isinstance(value, Sequence):
        for item in value:
            check_bounded(item, hint, name)
        return
    if isinstance(value, numbers.Number):
        bounds[0].check(value, name)


# ------------------------------------------------------------------------------- tensors


def listed(items: Sequence[str], most: int = 10) -> str:
    """``"a, b, c"``, or the first ``most`` items and ``"and N more"``."""
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _nonfinite_rows(t: torch.Tensor) -> list[int]:
    import torch

    bad = ~torch.isfinite(t.detach()).flatten(1).all(dim=1)
    return [int(i) for i in bad.nonzero().flatten().tolist()]


def check_finite_inputs(x: torch.Tensor, name: str = "input image(s)") -> None:
    """Check that a float (B, ...) batch holds no NaN or infinite values.

    Raises:
        InputError: naming the images (indices in the batch) that do.
    """
    if not x.is_floating_point():
        return
    rows = _nonfinite_rows(x)
    if rows:
        raise InputError(
            f"{name} {listed([str(r) for r in rows])} of the batch hold NaN or infinite "
            "values; give finite inputs (a normalisation std of 0 makes them)"
        )


def nonfinite_outputs(logits: torch.Tensor) -> NonFiniteError | None:
    """The error to raise when some rows of a model's (B, num_classes) outputs are NaN or
    infinite (naming the images, listing them in ``rows``), else ``None``."""
    rows = _nonfinite_rows(logits)
    if not rows:
        return None
    return NonFiniteError(
        f"the model's outputs are NaN or infinite for image(s) "
        f"{listed([str(r) for r in rows])} of the batch (of {logits.shape[0]}), although the "
        "inputs are finite; check the model's weights, or leave those images out",
        rows,
    )


# ------------------------------------------------------------------------------------ device

#: What a device may be called: ``auto`` picks CUDA when there is one.
DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or auto"


def parse_device(device: str | torch.device, name: str = "device") -> torch.device:
    """A device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``auto``) as an available
    :class:`torch.device`; ``auto`` picks CUDA when there is one, else the CPU.

    Raises:
        InputError: not a device name (``gpu``, ``cuda:x``), a kind of device convlens does
            not run on (``meta``), or a device that this machine lacks (``cuda`` without a
            GPU, ``cuda:3`` with two).
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        text = device.strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise InputError(f"{name} {device!r} is not a device; use {DEVICE_CHOICES}") from None
    else:
        raise InputError(f"{name} must be a device name ({DEVICE_CHOICES}), got {device!r}")
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {str(dev)!r} was asked for but no CUDA device is available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"{name} {str(dev)!r}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{name} 'mps' was asked for but MPS is not available here")
        return dev
    raise InputError(f"{name} {device!r} is not supported; use {DEVICE_CHOICES}")
