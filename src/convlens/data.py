"""Labelled image sets: an image-folder tree (one subfolder per class) or a CSV file."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from convlens.errors import ConvlensError, InputError
from convlens.images import IMAGE_EXTENSIONS, list_images
from convlens.models.classes import ClassList
from convlens.userfiles import read_user_text
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
        InputError: the CSV is not a regular file of UTF-8 text, lacks a path column, has a
            malformed row (fields missing, extra fields, an empty path; the message names the
            file and line), a label or folder name is not a class, or ``limit`` is not a
            positive integer.
    """
    if limit is not None:
        limit = positive_int(limit, "limit")
    if not str(data).strip():  # Path("") is the current folder
        raise InputError("an empty data path was given (an unset shell variable?)")
    data = Path(data).expanduser()
    items: list[tuple[Path, int | None]]
    if data.suffix.lower() == ".csv" and data.exists() and not data.is_dir():
        items = _read_csv(data, classes)
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


def _read_csv(data: Path, classes: ClassList) -> list[tuple[Path, int | None]]:
    """The rows of a labelled-image CSV (see :func:`read_labelled`).

    The first non-blank row is the header (column names are matched without case or surrounding
    spaces). Blank rows (empty, or only commas) are skipped; empty cells beyond the header's
    columns (trailing commas) are ignored. Line numbers in messages are the file's own, counted
    from 1 and including the header.
    """
    text = read_user_text(data, "CSV file")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    key = ""
    items: list[tuple[Path, int | None]] = []
    line = 0
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                key = next((k for k in ("path", "file") if k in header), "")
                if not key:
                    raise InputError(f"{data} needs a 'path' (or 'file') column; it has {row}")
                continue
            where = f"{data}, line {start}"
            if len(row) < len(header):
                raise InputError(
                    f"{where}: {len(row)} field(s) where the header has {len(header)} "
                    f"({','.join(header)}); give every column, an empty label as a trailing comma"
                )
            if any(cell.strip() for cell in row[len(header) :]):
                raise InputError(
                    f"{where}: {len(row)} fields where the header has {len(header)} "
                    f"({','.join(header)}); quote cells holding commas"
                )
            cells = dict(zip(header, row, strict=False))
            if not cells[key].strip():
                raise InputError(f"{where}: the {key} cell is empty")
            path = Path(cells[key])
            path = path if path.is_absolute() else data.parent / path
            label = cells.get("label", "").strip()
            try:
                items.append((path, classes.index(label) if label else None))
            except ConvlensError as exc:
                raise InputError(f"{where}: {exc}") from None
    except csv.Error as exc:
        raise InputError(f"{data}, line {reader.line_num}: not a valid CSV row ({exc})") from None
    if not items:
        raise InputError(f"{data} has no rows")
    return items
