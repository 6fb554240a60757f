"""Class lists: index, synset id and human-readable name of each output of a classifier."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from convlens.errors import TargetError, close_matches
from convlens.validate import int_text

__all__ = ["ClassList", "imagenet_classes"]

_SYNSET = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ClassList:
    """The classes a model predicts, in output order.

    Args:
        names: human-readable name of each class (``names[i]`` is output ``i``).
        synsets: optional WordNet ids (``n02123045``) of each class.
        source: where the list was read from (a file name), for messages.
    """

    names: tuple[str, ...]
    synsets: tuple[str, ...] | None = None
    source: str | None = field(default=None, compare=False, repr=False)
    _lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.synsets is not None and len(self.synsets) != len(self.names):
            raise ValueError("names and synsets must have the same length")
        lookup: dict[str, int] = {}
        for i, name in enumerate(self.names):
            lookup.setdefault(name.lower(), i)
        if self.synsets is not None:
            for i, syn in enumerate(self.synsets):
                lookup.setdefault(syn.lower(), i)
        object.__setattr__(self, "_lookup", lookup)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> str:
        return self.names[index]

    def short(self, index: int) -> str:
        """The first comma-separated part of a name (``"tabby, tabby cat"`` -> ``"tabby"``)."""
        return self.names[index].split(",")[0].strip()

    def index(self, target: int | str) -> int:
        """Resolve a class given by index, name (case-insensitive) or synset id.

        Raises:
            TargetError: the index is out of range or the name/synset is unknown; the message
                lists close matches.
        """
        if isinstance(target, bool):
            raise TargetError(f"target must be a class index, name or synset, not {target!r}")
        if isinstance(target, int):
            if not 0 <= target < len(self):
                raise TargetError(
                    f"target index {target} is out of range: the model has {len(self)} classes "
                    f"(0..{len(self) - 1})"
                )
            return target
        text = str(target).strip()
        number = int_text(text)
        if number is not None:
            return self.index(number)
        key = text.lower()
        if key in self._lookup:
            return self._lookup[key]
        # A name may also match one of the comma-separated aliases ("tabby" in "tabby, tabby cat").
        for i, name in enumerate(self.names):
            if key in (part.strip().lower() for part in name.split(",")):
                return i
        # "tabby cat" -> "tabby": the one class all of whose words occur in the query.
        words = set(re.findall(r"[\w'-]+", key))
        subsets = [
            (len(ws), i)
            for i, name in enumerate(self.names)
            if (ws := set(re.findall(r"[\w'-]+", name.lower()))) and ws <= words
        ]
        if subsets:
            subsets.sort(reverse=True)
            if len(subsets) == 1 or subsets[0][0] > subsets[1][0]:
                return subsets[0][1]
        hint = close_matches(text, self.names)
        kind = "synset" if _SYNSET.match(text) else "class name"
        raise TargetError(f"unknown {kind} {text!r}.{hint}")

    @classmethod
    def from_file(cls, path: str | Path) -> ClassList:
        """Read a class list: one name per line, or a TSV/CSV with ``index, synset, name`` columns.

        The file must be a regular file of UTF-8 text (see
        :func:`convlens.userfiles.read_user_text`).

        Raises:
            TargetError: the file is missing, not a regular file, not UTF-8 text, empty, or a
                row of a TSV/CSV is malformed (the message names the file and line).
        """
        from convlens.userfiles import read_user_text

        text = read_user_text(path, "class list", error=TargetError)
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> ClassList:
        """Parse the formats of :meth:`from_file`.

        Blank lines are skipped. In a TSV/CSV the header names the columns (``name`` required,
        ``index`` and ``synset`` optional); every row has as many fields as the header, and the
        indices, when given, are 0 ... n-1 in any order.

        Raises:
            TargetError: the text is empty or a row is malformed (the message names ``source``
                and the line).
        """
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        if not lines:
            raise TargetError(f"class list {source} is empty")
        first = lines[0][1]
        delim = "\t" if "\t" in first else None
        header = [h.strip() for h in first.lower().replace(",", "\t").split("\t")]
        if delim is None and "name" in header and "index" in header:
            delim = ","
        if delim is None or "name" not in header:
            return cls(tuple(ln.strip() for _, ln in lines), source=source)
        columns = [h.strip() for h in next(csv.reader([first.lower()], delimiter=delim))]
        rows: list[tuple[int | None, str, str | None]] = []
        for n, line in lines[1:]:
            where = f"class list {source}, line {n}"
            cells = [c.strip() for c in next(csv.reader([line], delimiter=delim), [])]
            if len(cells) != len(columns):
                raise TargetError(
                    f"{where}: {len(cells)} field(s) where the header has {len(columns)} "
                    f"({', '.join(columns)})"
                )
            row = dict(zip(columns, cells, strict=True))
            if not row["name"]:
                raise TargetError(f"{where}: the name is empty")
            index = None
            if "index" in row:
                try:
                    index = int(row["index"])
                except ValueError:
                    raise TargetError(
                        f"{where}: index {row['index']!r} is not a whole number"
                    ) from None
            rows.append((index, row["name"], row.get("synset")))
        if not rows:
            raise TargetError(f"class list {source} has a header but no classes")
        if "index" in columns:
            indices = sorted(i for i, _, _ in rows if i is not None)
            if indices != list(range(len(rows))):
                raise TargetError(
                    f"class list {source}: the indices must be 0 ... {len(rows) - 1}, each once "
                    "(one row per model output)"
                )
            rows.sort(key=lambda r: r[0] or 0)
        names = tuple(name for _, name, _ in rows)
        synsets = tuple(syn or "" for _, _, syn in rows) if "synset" in columns else None
        return cls(names, synsets, source=source)

    @classmethod
    def generic(cls, n: int) -> ClassList:
        """Names ``class 0`` ... ``class n-1`` for a model with no class list."""
        return cls(tuple(f"class {i}" for i in range(n)))

    def top(self, probs: Sequence[float], k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` most probable classes as ``(index, name, probability)``."""
        order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))[:k]
        return [(i, self.names[i], float(probs[i])) for i in order]


@cache
def imagenet_classes() -> ClassList:
    """The 1000 ImageNet-1k classes in the usual (sorted synset) model output order."""
    text = resources.files("convlens.models").joinpath("imagenet_classes.tsv").read_text("utf-8")
    return ClassList.from_text(text, source="imagenet_classes.tsv")
