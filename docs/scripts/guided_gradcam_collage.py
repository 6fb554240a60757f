"""Render docs/img/guided_gradcam_cat_vs_cup.png: guided Grad-CAM for two classes on one photo.

A collage of two photos bundled with scikit-image (the cat and the coffee cup) is explained for
"tiger cat" and for "espresso" with Grad-CAM, guided backprop and guided Grad-CAM.
Run: python docs/scripts/guided_gradcam_collage.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import convlens


def collage() -> Image.Image:
    cat = Image.fromarray(skimage.data.chelsea()).resize((300, 300))
    cup = Image.fromarray(skimage.data.coffee()).resize((400, 300))
    canvas = Image.new("RGB", (600, 300))
    canvas.paste(cat.crop((0, 0, 300, 300)), (0, 0))
    canvas.paste(cup.crop((80, 0, 380, 300)), (300, 0))
    return canvas


def main() -> None:
    model = convlens.load_model()
    model.preprocess = convlens.Preprocess(resize=None, crop=224)  # keep both halves
    img = collage()
    x = model.preprocess(img).unsqueeze(0)
    classes = ["tiger cat", "espresso"]
    methods = ["gradcam", "guided", "guided-gradcam"]
    fig = Figure(figsize=(3 * (len(methods) + 1), 3 * len(classes) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(classes), len(methods) + 1)
    for r, cls in enumerate(classes):
        res = convlens.explain(model, x, methods, target=cls)
        axes[r, 0].imshow(np.asarray(img.resize((224, 224))))
        axes[r, 0].set_title(f"target: {cls} (p={float(res['gradcam'].probs[0, 0]):.2f})")
        for c, m in enumerate(methods, start=1):
            axes[r, c].imshow(np.asarray(res[m].overlay(0, 0)))
            axes[r, c].set_title(m)
    for ax in axes.flat:
        ax.set_axis_off()
    out = Path(__file__).resolve().parents[1] / "img" / "guided_gradcam_cat_vs_cup.png"
    fig.savefig(out, dpi=80)
    with torch.no_grad():
        top = torch.softmax(model.net(x), 1).topk(5)
    pairs = zip(top.values[0].tolist(), top.indices[0].tolist(), strict=True)
    print(out, [(model.classes[i], round(p, 3)) for p, i in pairs])


if __name__ == "__main__":
    main()
