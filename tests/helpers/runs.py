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
    data = root / "data"
    rng = np.random.default_rng(0)
    for c, folder in enumerate(("cat", "dog", "coffee_mug")):
        (data / folder).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            pixels[..., c] = 255 - k * 40
            Image.fromarray(pixels).save(data / folder / f"img{k}.png")
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
