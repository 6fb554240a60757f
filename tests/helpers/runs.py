"""A tiny analysis run (a seeded three-class user model, nine generated images), made in seconds,
for the tests of what reads run folders (the live explorer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from convlens.models import Preprocess, load_model
from convlens.models.base import ConvlensModel
from tests.helpers.models import tiny_net_source

CLASSES = ("cat", "dog", "coffee mug")


def write_class_images(
    folder: Path, per_class: int, shape: tuple[int, int] = (40, 48), step: int = 40
) -> Path:
    """``per_class`` seeded random PNGs in one subfolder per class of :data:`CLASSES`
    (``cat/``, ``dog/``, ``coffee_mug/``), each with a strong class signal (its class's colour
    channel at ``255 - k * step``): the labelled data the tiny model of
    :func:`tests.helpers.models.tiny_net_source` gets partly right. Returns ``folder``."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "coffee_mug")):
        (folder / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
            pixels[..., c] = 255 - k * step
            Image.fromarray(pixels).save(folder / name / f"img{k}.png")
    return folder


@dataclass(frozen=True)
class TinyRun:
    """A run folder with its model and data."""

    root: Path  # the folder holding net.py, labels.txt, data/ and run/
    data: Path
    run: Path

    def model(self) -> ConvlensModel:
        """The run's model, loaded afresh (32 x 32 inputs)."""
        return load_model(
            f"{self.root / 'net.py'}:build",
            classes=self.root / "labels.txt",
            preprocess=Preprocess(resize=36, crop=32),
        )


def tiny_run(root: Path, *, failure_modes: bool = False) -> TinyRun:
    """Write the model, the images (three per class, each with some class signal) and analyse
    them into ``root / "run"`` (Grad-CAM, no faithfulness; failure modes and their pages only
    when ``failure_modes``)."""
    from convlens.analysis import analyze

    (root / "net.py").write_text(tiny_net_source(seed=1))
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    data = write_class_images(root / "data", per_class=3)
    made = TinyRun(root, data, root / "run")
    analyze(
        made.model(),
        data,
        made.run,
        methods="gradcam",
        top_errors=3,
        faithfulness=False,
        failure_modes=failure_modes,
        progress=False,
    )
    return made
