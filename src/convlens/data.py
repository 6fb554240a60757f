"""Labelled image sets: an image-folder tree (one subfolder per class) or a CSV file."""

from __future__ import annotations

import csv
from pathlib import Path

from convlens.errors import ConvlensError, InputError
from convlens.images import IMAGE_EXTENSIONS, list_images
from convlens.models.classes import ClassList
from convlens.validate import positive_int

__all__ = ["read_labelled"]


def read_labelled(
    data: str | Path, classes: ClassList, *, limit: int | None = None
) -> list[tuple[Path, int | None]]:
    """Image paths with their class index (``None`` when the set carries no labels).

    Args:
        data: a CSV file with a ``path`` (or ``file``) column and an optional ``label`` column
            (class index, name or synset; relative paths are relative to the CSV's folder); a
            folder whose subfolders are named after classes (name or synset); or a folder or
            image file without labels.
        classes: the model's class list, to resolve labels.
        limit: keep at most this many images (in sorted order).

    Raises:
        InputError: the CSV lacks a path column, a label or folder name is not a class, or
            ``limit`` is not a positive integer.
    """
    if limit is not None:
        limit = positive_int(limit, "limit")
    if not str(data).strip():  # Path("") is the current folder
        raise InputError("an empty data path was given (an unset shell variable?)")
    data = Path(data).expanduser()
    items: list[tuple[Path, int | None]]
    if data.is_file() and data.suffix.lower() == ".csv":
        with data.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise InputError(f"{data} has no rows")
        key = "path" if "path" in rows[0] else "file" if "file" in rows[0] else None
        if key is None:
            raise InputError(f"{data} needs a 'path' (or 'file') column; it has {list(rows[0])}")
        items = []
        for n, row in enumerate(rows, start=2):
            path = Path(row[key])
            path = path if path.is_absolute() else data.parent / path
            label = (row.get("label") or "").strip()
            try:
                items.append((path, classes.index(label) if label else None))
            except ConvlensError as exc:
                raise InputError(f"{data}, line {n}: {exc}") from None
    elif data.is_dir() and (
        subdirs := sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    ):
        items = []
        for sub in subdirs:
            try:
                label = classes.index(sub.name.replace("_", " "))
            except ConvlensError:
                try:
                    label = classes.index(sub.name)
                except ConvlensError as exc:
                    raise InputError(f"folder {sub.name!r} is not a class: {exc}") from None
            items += [(p, label) for p in list_images([sub])]
        items += [
            (p, None)
            for p in sorted(data.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
    else:
        items = [(p, None) for p in list_images([data])]
    return items[:limit] if limit is not None else items
