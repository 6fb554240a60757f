"""Turning what the user asks for (class index, name, synset, top-k) into class indices."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from convlens.errors import TargetError
from convlens.models.classes import ClassList
from convlens.validate import int_text

__all__ = ["TargetSpec", "resolve_targets", "target_from_text"]

#: A target for every image (int or str), one per image (sequence), or (B,) / (B, K) indices.
TargetSpec = int | str | Sequence[int | str] | Sequence[Sequence[int | str]] | torch.Tensor | None


def target_from_text(text: str) -> int | str:
    """A target as the user typed it (``--target``, ``--class``): the class index when the text
    is an integer in ASCII digits (``"281"``, ``"-1"``, which then fails as out of range), else
    the text itself, a class name or synset for :meth:`ClassList.index
    <convlens.models.classes.ClassList.index>`. The one reader of target text."""
    number = int_text(text)
    return text if number is None else number


def _one(value: int | str, classes: ClassList | None, num_classes: int) -> int:
    if classes is not None and len(classes) == num_classes:
        return classes.index(value)
    if isinstance(value, str):
        number = int_text(value)
        if number is None:
            raise TargetError(
                f"target {value!r} is a name, but the model has no class list; "
                "give an index or load the model with a class list (--classes labels.txt)"
            )
        value = number
    if isinstance(value, bool) or not isinstance(value, int):
        raise TargetError(f"target must be a class index, name or synset, not {value!r}")
    if not 0 <= value < num_classes:
        raise TargetError(
            f"target index {value} is out of range: the model has {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    return value


def resolve_targets(
    target: TargetSpec,
    logits: torch.Tensor,
    *,
    classes: ClassList | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Class indices to explain, shape (B, K).

    Args:
        target: ``None`` for the model's top-1 class (or top ``top_k``); one class for every
            image (index, name such as ``"tabby cat"``, or synset such as ``"n02123045"``);
            a sequence with one entry per image; a nested sequence or (B, K) tensor with several
            classes per image.
        logits: (B, num_classes) scores of the unchanged inputs.
        classes: names for resolving strings.
        top_k: explain the ``top_k`` most probable classes of each image (``target`` must be
            ``None``).

    Raises:
        TargetError: unknown name, index out of range, wrong number of per-image targets.
    """
    b, n = logits.shape
    device = logits.device
    if top_k is not None:
        if target is not None:
            raise TargetError("give either a target or top_k, not both")
        if not 1 <= top_k <= n:
            raise TargetError(f"top_k must be between 1 and {n}, got {top_k}")
        return logits.topk(top_k, dim=1).indices
    if target is None:
        return logits.argmax(dim=1, keepdim=True)
    if isinstance(target, torch.Tensor):
        t = target.to(device=device, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(b)
        if t.dim() == 1:
            t = t[:, None]
        if t.dim() != 2 or t.shape[0] != b:
            raise TargetError(f"target tensor must have shape (B,) or (B, K) with B={b}")
        bad = (t < 0) | (t >= n)
        if bad.any():
            raise TargetError(
                f"target index {int(t[bad][0])} is out of range: the model has {n} classes "
                f"(0..{n - 1})"
            )
        return t
    if isinstance(target, (int, str)):
        return torch.full((b, 1), _one(target, classes, n), dtype=torch.long, device=device)
    items = list(target)
    if len(items) != b:
        raise TargetError(f"got {len(items)} targets for {b} images; give one per image")
    rows: list[list[int]] = []
    for item in items:
        if isinstance(item, (int, str)):
            rows.append([_one(item, classes, n)])
        else:
            rows.append([_one(v, classes, n) for v in item])
    if len({len(r) for r in rows}) != 1:
        raise TargetError("every image needs the same number of targets")
    return torch.tensor(rows, dtype=torch.long, device=device)
