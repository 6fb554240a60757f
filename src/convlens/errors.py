"""Exceptions raised by convlens.

Every error a user can cause derives from :class:`ConvlensError`; its message says what went wrong
and what to do. The CLI prints the message on one line and exits non-zero (traceback with --debug).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BlankMapWarning",
    "ConvlensError",
    "ConvlensWarning",
    "ImageError",
    "InferenceModeError",
    "InputError",
    "LayerError",
    "ModelLoadError",
    "NonFiniteError",
    "NonFiniteMapWarning",
    "OutputError",
    "RandomWeightsWarning",
    "RunFolderError",
    "TargetError",
    "UnsupportedModelError",
    "close_matches",
]


class ConvlensError(Exception):
    """Base class of every error convlens raises on bad input."""


class ImageError(ConvlensError, ValueError):
    """An image file cannot be read, is corrupt, or is too small."""


class InputError(ConvlensError, ValueError):
    """A tensor given to a method has the wrong shape, dtype or device."""


class TargetError(ConvlensError, ValueError):
    """A target class cannot be resolved (unknown name, index out of range)."""


class LayerError(ConvlensError, ValueError):
    """A layer name does not exist in the model or its output is unusable for the method."""


class UnsupportedModelError(ConvlensError, ValueError):
    """The model lacks the structure a method needs (e.g. CAM without global average pooling)."""


class InferenceModeError(ConvlensError, RuntimeError):
    """A gradient method was called under ``torch.inference_mode`` or on inference tensors."""


class ModelLoadError(ConvlensError, ValueError):
    """A model specification cannot be loaded."""


class OutputError(ConvlensError, OSError):
    """An output file cannot be written (full disk, permissions); the message names the file."""


class RunFolderError(ConvlensError, RuntimeError):
    """An output folder is being written by another convlens process, or holds another run."""


class NonFiniteError(ConvlensError, ArithmeticError):
    """The model's outputs are NaN or infinite for finite inputs (broken weights, an overflow
    in the network); the message names the images of the batch.

    Attributes:
        rows: indices, in the batch, of the images whose outputs are not finite.
    """

    def __init__(self, message: str, rows: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


class ConvlensWarning(UserWarning):
    """Base class of the warnings convlens gives about results that may mislead."""


class BlankMapWarning(ConvlensWarning):
    """A method returned an all-zero map (nothing to show) for some images and targets; they
    are flagged in the result's ``meta["blank"]``."""


class RandomWeightsWarning(ConvlensWarning):
    """A zoo model was built with random weights (asked for with ``random_weights=True`` /
    ``--random-weights``): its predictions and maps mean nothing; it only tries the plumbing."""


class NonFiniteMapWarning(ConvlensWarning):
    """A method returned a map containing NaN or infinite values for some images and targets;
    they are flagged in the result's ``meta["nonfinite"]``."""


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean: a, b?"`` for the closest choices, or an empty string."""
    choices = list(choices)
    lowered = word.lower()
    # Names containing the word as a whole word first ("cat" -> "tiger cat"), then spelling.
    found = [c for c in choices if lowered in c.lower().replace(",", " ").split()][:n]
    for c in difflib.get_close_matches(word, choices, n=n, cutoff=0.5):
        if len(found) < n and c not in found:
            found.append(c)
    if not found:
        found = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(repr(f) for f in found)}?" if found else ""
