"""Faithfulness of the explained mistakes' maps: deletion/insertion AUCs, cached per image.

Each examined image's map of each method for the predicted class is scored with
:func:`convlens.metrics.deletion_insertion_many` (Petsiuk, Das & Saenko 2018, "RISE", §4), next
to a random map of the same image, so that a reader can see whether a method beats chance. The
scores live in ``RUN_DIR/explanations/faithfulness.json`` beside the explanation panels:

.. code-block:: json

    {"settings": {"target": "predicted", "steps": 20, ...},
     "images": {"<image id>": {"gradcam": {"deletion_auc": 0.12, "insertion_auc": 0.55},
                               "(random)": {...}}}}

The file is rewritten (atomically) after each chunk of images, so an interrupted run keeps what
it computed; scores made under other ``settings`` are discarded on load.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from convlens.atomic import atomic_write_text
from convlens.console import printable
from convlens.metrics.faithfulness import DEFAULT_STEPS

__all__ = [
    "FILE_NAME",
    "RANDOM_MAP",
    "SETTINGS",
    "ScoreCache",
    "random_maps",
    "score_maps",
    "summarize",
]

log = logging.getLogger(__name__)

FILE_NAME = "faithfulness.json"
RANDOM_MAP = "(random)"
"""Name of the random reference map in the scores."""

SETTINGS: dict[str, Any] = {
    "target": "predicted",
    "steps": DEFAULT_STEPS,
    "deletion_baseline": "zero",
    "insertion_baseline": "blur",
    "blur_sigma": 10.0,
    "score": "prob",
    "random_map": "uniform noise seeded by the image id",
}
"""How the scores were made; stored with them, and stored scores made otherwise are dropped."""

Scores = dict[str, dict[str, dict[str, float]]]
"""``{image id: {method: {"deletion_auc": float, "insertion_auc": float}}}``."""


def random_maps(ids: Sequence[str], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) uniform-noise maps, each seeded by its image id: the same map for an image
    whatever chunk it is scored in."""
    from convlens.metrics import baseline_map

    return torch.cat([baseline_map("random", 1, size, seed=int(i[:15], 16)) for i in ids])


def score_maps(
    model: Any,
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    ids: Sequence[str],
    *,
    batch_size: int,
) -> Scores:
    """Deletion and insertion AUC of each map and of a random map, one call for all of them
    (the curves' end points are shared).

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        maps: ``{method: (B, H, W) map}``.
        targets: (B,) classes the maps explain.
        ids: the B image ids (they seed the random maps).
        batch_size: images per forward pass.

    Returns:
        ``{image id: {method: {"deletion_auc": ..., "insertion_auc": ...}}}``, the random map
        under :data:`RANDOM_MAP`.
    """
    import convlens.metrics as metrics

    every = {**maps, RANDOM_MAP: random_maps(ids, (x.shape[-2], x.shape[-1])).to(x)}
    curves = metrics.deletion_insertion_many(
        model,
        x,
        every,
        targets=targets,
        steps=SETTINGS["steps"],
        deletion_baseline=SETTINGS["deletion_baseline"],
        insertion_baseline=SETTINGS["insertion_baseline"],
        blur_sigma=SETTINGS["blur_sigma"],
        score=SETTINGS["score"],
        batch_size=batch_size,
    )
    dels = {m: c.deletion_auc.tolist() for m, c in curves.items()}
    ins = {m: c.insertion_auc.tolist() for m, c in curves.items()}
    return {
        image: {
            m: {"deletion_auc": float(dels[m][b]), "insertion_auc": float(ins[m][b])}
            for m in curves
        }
        for b, image in enumerate(ids)
    }


class ScoreCache:
    """The scores of ``RUN_DIR/explanations/faithfulness.json``, loaded and saved whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scores: Scores = {}
        if not path.is_file():
            return
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", printable(str(path)), printable(str(exc)))
            return
        if not isinstance(stored, dict) or stored.get("settings") != SETTINGS:
            log.info(
                "faithfulness scores in %s were made with other settings; redoing",
                printable(str(path)),
            )
            return
        self.scores = dict(stored.get("images", {}))

    def has(self, image: str, methods: Iterable[str]) -> bool:
        """Whether ``image`` has scores for every one of ``methods`` and the random map."""
        row = self.scores.get(image, {})
        return all(m in row for m in (*methods, RANDOM_MAP))

    def update(self, scores: Scores) -> None:
        """Add (or replace) the scores of some images."""
        self.scores.update(scores)

    def save(self) -> None:
        """Write the file atomically (a crash mid-write leaves the previous version).

        Raises:
            OutputError: the file cannot be written (full disk, permissions).
        """
        atomic_write_text(
            self.path, json.dumps({"settings": SETTINGS, "images": self.scores}, indent=1)
        )


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def summarize(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """Per method: mean deletion and insertion AUC over the images, and the share of images
    where the method beats the random map (lower deletion AUC, higher insertion AUC).

    Args:
        scores: ``{image id: {method: {"deletion_auc": ..., "insertion_auc": ...}}}`` with the
            random map under :data:`RANDOM_MAP`.

    Returns:
        ``{"settings": ..., "images": N, "methods": {method: {"images", "deletion_auc",
        "insertion_auc", "beats_random_deletion", "beats_random_insertion"}}}``: means and
        shares in [0, 1]; the random map's row has no shares (``None``). Methods are in the
        order first seen, the random map last; ``methods`` is empty without scores.
    """
    methods = list(dict.fromkeys(m for row in scores.values() for m in row if m != RANDOM_MAP))
    out: dict[str, Any] = {}
    for m in [*methods, RANDOM_MAP] if scores else []:
        rows = [row for row in scores.values() if m in row]
        vs = [row for row in rows if RANDOM_MAP in row]
        beats_del = [row[m]["deletion_auc"] < row[RANDOM_MAP]["deletion_auc"] for row in vs]
        beats_ins = [row[m]["insertion_auc"] > row[RANDOM_MAP]["insertion_auc"] for row in vs]
        random = m == RANDOM_MAP
        out[m] = {
            "images": len(rows),
            "deletion_auc": _mean([row[m]["deletion_auc"] for row in rows]),
            "insertion_auc": _mean([row[m]["insertion_auc"] for row in rows]),
            "beats_random_deletion": None if random or not vs else sum(beats_del) / len(vs),
            "beats_random_insertion": None if random or not vs else sum(beats_ins) / len(vs),
        }
    return {"settings": dict(SETTINGS), "images": len(scores), "methods": out}
