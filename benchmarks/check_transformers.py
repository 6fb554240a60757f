"""Check the CLI end to end on real, full-size zoo models (random weights), on the CPU.

Not part of the test suite (each model takes seconds to minutes on a shared CPU): the suite runs
the same code paths on tiny configurations of the same classes (``tests/helpers/zoo.py``). This
script builds the real architectures with ``--random-weights`` (nothing is downloaded; the maps
mean nothing, only the plumbing is checked; torchvision's ViT gets a saved random state dict
with a non-zero head instead, see :func:`_random_head`), and for each one runs

- ``convlens explain`` on one photo (scikit-image's astronaut, saved to a temporary PNG) with
  cheap methods: ``gradcam``, ``gradcam++``, ``saliency``, occlusion with a large stride, and
  attention rollout / relevance (``rollout``, ``chefer``) on the plain ViTs;
- ``convlens features`` on three copies of the photo at the model's default layer (for
  transformers, a token layer: the browser shows the patch under each token).

It prints one markdown table row per command (exit code, wall seconds) and exits non-zero when
any command fails. Timings are those of a shared machine: read them as orders of magnitude.

Example:
    python benchmarks/check_transformers.py                       # all four models
    python benchmarks/check_transformers.py --models timm:deit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("check_transformers")

REPO = Path(__file__).resolve().parents[1]

MODELS = (
    "torchvision:vit_b_16",
    "torchvision:swin_t",
    "torchvision:convnext_tiny",
    "timm:deit_tiny_patch16_224",
)
CAM = "gradcam,gradcam++,saliency,occlusion"
ATTENTION = ",rollout,chefer"  # plain ViTs (class token, global attention) only


def _photo(folder: Path) -> Path:
    """scikit-image's astronaut as a PNG in ``folder``."""
    from PIL import Image
    from skimage import data

    path = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def _random_head(spec: str, folder: Path) -> list[str]:
    """The weight options for ``spec``: ``--random-weights``, except for torchvision's ViTs,
    whose classification head torchvision initialises to zero (every logit 0, every gradient
    map blank): for them a state dict of the random model with a random-normal head (std 0.02),
    so that the gradient methods have something to show."""
    if not spec.startswith("torchvision:vit_"):
        return ["--random-weights"]
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(spec.split(":", 1)[1], weights=None)
    torch.nn.init.normal_(net.heads.head.weight, std=0.02)
    path = folder / f"{spec.replace(':', '_')}-random-head.pt"
    torch.save(net.state_dict(), path)
    return ["--weights", str(path)]


def _run(args: Sequence[str]) -> tuple[int, float, str]:
    """Run ``convlens ARGS`` in a child process: (exit code, seconds, last line of stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-c", "from convlens.cli import main; main()", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    return done.returncode, seconds, lines[-1] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; return 0 when every command succeeded."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs here")
    parser.add_argument("--skip-features", action="store_true", help="only run explain")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = opts.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        photo = _photo(root)
        images = root / "images"
        images.mkdir(exist_ok=True)
        for i in range(3):
            (images / f"copy{i}.png").write_bytes(photo.read_bytes())
        logger.info("| model | command | exit | seconds | last line |")
        logger.info("|---|---|---|---|---|")
        for spec in opts.models.split(","):
            slug = spec.replace(":", "_")
            methods = CAM + (ATTENTION if "vit" in spec or "deit" in spec else "")
            model = ["--model", spec, *_random_head(spec, root)]
            explain = ["explain", str(photo), *model, "--methods", methods]
            explain += ["--patch", "64", "--stride", "64", "--out", str(root / f"explain-{slug}")]
            runs = [(f"explain {methods}", explain)]
            if not opts.skip_features:
                features = ["features", str(images), *model, "--top", "3", "--num-channels", "4"]
                features += ["--batch-size", "3", "--out", str(root / f"features-{slug}")]
                runs.append(("features (default layer, top 3, 4 channels)", features))
            for what, args in runs:
                code, seconds, last = _run(args)
                failed += code != 0
                shown = last.replace("|", "/")[:160]
                logger.info("| %s | %s | %d | %.1f | %s |", spec, what, code, seconds, shown)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
