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

__all__ = ["ClassList", "imagenet_classes"]

_SYNSET = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ClassList:
    """The classes a model predicts, in output order.

    Args:
        names: human-readable name of each class (``names[i]`` is output ``i``).
        synsets: optional WordNet ids (``n02123045``) of each class.
    """

    names: tuple[str, ...]
    synsets: tuple[str, ...] | None = None
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
        if re.fullmatch(r"-?\d+", text):
            return self.index(int(text))
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

        Raises:
            TargetError: the file is missing or empty.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TargetError(f"cannot read class list {path}: {exc.strerror}") from exc
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> ClassList:
        """Parse the formats of :meth:`from_file`."""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise TargetError(f"class list {source} is empty")
        delim = "\t" if "\t" in lines[0] else None
        header = lines[0].lower().replace(",", "\t").split("\t")
        if delim is None and "name" in header and "index" in header:
            delim = ","
        if delim is not None and "name" in [h.strip() for h in header]:
            rows = list(csv.DictReader(lines, delimiter=delim))
            rows.sort(key=lambda r: int(r["index"]) if r.get("index") else 0)
            names = tuple(r["name"].strip() for r in rows)
            synsets = tuple(r["synset"].strip() for r in rows) if "synset" in rows[0] else None
            return cls(names, synsets)
        return cls(tuple(ln.strip() for ln in lines))

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
