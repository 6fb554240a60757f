"""``convlens predict``, ``explain``, ``layers``, ``methods`` and ``demo``: one image set
explained, and what there is to explain it with."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from convlens.cli.options import (
    LOADING,
    BatchSizeOpt,
    ImagesArg,
    MethodsOpt,
    ModelOptions,
    OutDirOpt,
    checked,
    option_group,
    out,
    parse_methods,
    progress_bar,
    say,
)
from convlens.errors import ConvlensError, ImageError, InputError
from convlens.targets import target_from_text
from convlens.validate import fraction, positive_int

__all__ = ["register", "run_explain"]


def _some_images(paths: Sequence[str]) -> list[Path]:
    """The image files under ``paths``; an error when there are none."""
    from convlens.images import IMAGE_EXTENSIONS, list_images

    files = list_images(paths)
    if not files:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ImageError(
            f"no images found in {', '.join(str(p) for p in paths)} (looked for {kinds})"
        )
    return files


def _batches(paths: Sequence[Path], size: int) -> list[list[Path]]:
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


@option_group(ModelOptions, only=LOADING)
def predict(
    images: ImagesArg,
    *,
    model_options: ModelOptions,
    top: Annotated[
        int,
        typer.Option(help="Number of classes to show.", callback=checked(positive_int)),
    ] = 5,
    batch_size: BatchSizeOpt = 16,
) -> None:
    """Show the top classes the model predicts for each image."""
    files = _some_images(images)
    net = model_options.load()
    for chunk in _batches(files, batch_size):
        x = net.load_images(chunk).to(net.device)
        idx, probs = net.predict(x, k=top)
        for i, path in enumerate(chunk):
            say(str(path), console=out)  # a line of its own: a long path is not wrapped
            table = Table(show_edge=False)
            table.add_column("#", justify="right")
            table.add_column("class")
            table.add_column("index", justify="right")
            table.add_column("probability", justify="right")
            for r in range(idx.shape[1]):
                c = int(idx[i, r])
                table.add_row(str(r + 1), net.classes[c], str(c), f"{float(probs[i, r]):.3f}")
            out.print(table)


def _parse_target(text: str | None) -> int | str | None:
    return None if text is None else target_from_text(text)


def multiclass_method(methods: Sequence[str]) -> str | None:
    """The method of ``methods`` whose maps make the multi-class view: the highest
    :attr:`~convlens.methods.Method.multiclass_rank` above 0, the first given on a tie; ``None``
    when no method has one (names not registered count as 0)."""
    from convlens.methods import METHODS

    ranks = {m: METHODS[m].multiclass_rank for m in methods if m in METHODS}
    best = max(ranks, key=ranks.__getitem__, default=None)
    return best if best is not None and ranks[best] > 0 else None


def run_explain(
    model_obj,
    files: Sequence[Path],
    out_dir: Path,
    *,
    methods: Sequence[str],
    target: int | str | None = None,
    top_k: int | None = None,
    layer: str | None = None,
    batch_size: int = 8,
    options: dict[str, dict[str, object]] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> list[Path]:
    """Explain image files and write panels; returns the written PNG paths.

    Outputs are named after the inputs by :func:`~convlens.outputs.claim_output_stems`
    (``STEM_panel.png``; ``STEM-HASH_panel.png`` for an input whose stem another input of this
    or an earlier run into ``out_dir`` has), written atomically, under the lock of ``out_dir``.
    With several targets per image, one method's maps (:func:`multiclass_method`) also make a
    multi-class figure, ``STEM_METHOD_topK.png``.
    """
    from convlens.api import explain
    from convlens.atomic import save_image
    from convlens.hooks import named_module
    from convlens.outputs import claim_output_stems, lock_folder
    from convlens.render import multiclass_figure, save_figure, side_by_side_figure

    if layer is not None:
        named_module(model_obj.net, layer.rpartition("@")[0] or layer)
    written: list[Path] = []
    multi = multiclass_method(methods)
    with lock_folder(out_dir, "explain"), progress_bar() as bar:
        stems: dict[Path, str] | None = None  # claimed once the first images are explained
        task = bar.add_task("explaining", total=len(files) * len(methods))
        for chunk in _batches(files, batch_size):
            x = model_obj.load_images(chunk).to(model_obj.device)
            results = {}
            for name in methods:
                bar.update(task, description=f"{name:>10}")
                results.update(
                    explain(model_obj, x, [name], target, top_k=top_k, layer=layer, options=options)
                )
                bar.advance(task, len(chunk))
            if stems is None:  # bad targets or layers fail above, before any name is taken
                names = claim_output_stems(out_dir, files, lambda stem: f"{stem}_panel.png")
                stems = dict(zip(files, names, strict=True))
            for i, path in enumerate(chunk):
                stem = stems[path]
                fig = side_by_side_figure(results, i, cmap=cmap, alpha=alpha)
                written.append(save_figure(fig, out_dir / f"{stem}_panel.png"))
                for name, exp in results.items():
                    for k in range(exp.num_targets):
                        suffix = "" if exp.num_targets == 1 else f"_{k + 1}"
                        png = out_dir / f"{stem}_{name}{suffix}.png"
                        save_image(exp.overlay(i, k, cmap=cmap, alpha=alpha), png)
                        written.append(png)
                if multi is not None and results[multi].num_targets > 1:
                    fig = multiclass_figure(results[multi], i)
                    written.append(save_figure(fig, out_dir / f"{stem}_{multi}_top{top_k}.png"))
    return written


def _check_cmap(name: str) -> str:
    """``--cmap``, checked as it is parsed (an unknown name fails before any work)."""
    from convlens.render.overlay import get_cmap

    get_cmap(name)
    return name


@option_group(ModelOptions)
def explain_cmd(
    images: ImagesArg,
    *,
    methods: MethodsOpt = "saliency,occlusion,cam,gradcam",
    target: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Class to explain: index, name ('tabby cat') or synset; default top-1."),
    ] = None,
    top_k: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--top-k",
            help="Explain the k most probable classes (multi-class view).",
            callback=checked(positive_int),
        ),
    ] = None,
    layer: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Layer for Grad-CAM & co. (`convlens layers`); name@call for "
            "modules called several times."
        ),
    ] = None,
    out_dir: OutDirOpt = Path("convlens-out"),
    model_options: ModelOptions,
    batch_size: BatchSizeOpt = 8,
    patch: Annotated[
        int,
        typer.Option(help="Occlusion patch size (pixels).", callback=checked(positive_int)),
    ] = 32,
    stride: Annotated[
        int,
        typer.Option(help="Occlusion stride (pixels).", callback=checked(positive_int)),
    ] = 16,
    fill: Annotated[str, typer.Option(help="Occlusion fill: mean, blur, zero or a number.")] = (
        "mean"
    ),
    cmap: Annotated[str, typer.Option(help="Matplotlib colour map.", callback=_check_cmap)] = "jet",
    alpha: Annotated[
        float, typer.Option(help="Heatmap opacity.", callback=checked(fraction))
    ] = 0.5,
) -> None:
    """Explain predictions: one side-by-side panel per image plus one overlay per method."""
    from convlens.methods.options import build_methods

    names = parse_methods(methods)
    files = _some_images(images)
    net = model_options.load()
    fill_value: str | float = fill
    with contextlib.suppress(ValueError):
        fill_value = float(fill)
    opts: dict[str, dict[str, object]] = {
        "occlusion": {"patch": patch, "stride": stride, "fill": fill_value}
    }
    build_methods({n: opts.get(n, {}) for n in names})  # bad option values fail before any work
    try:
        written = run_explain(
            net,
            files,
            out_dir,
            methods=names,
            target=_parse_target(target),
            top_k=top_k,
            layer=layer,
            batch_size=batch_size,
            options=opts,
            cmap=cmap,
            alpha=alpha,
        )
    except ValueError as exc:
        if isinstance(exc, ConvlensError):
            raise
        raise InputError(str(exc)) from exc
    say(f"wrote {len(written)} images to {out_dir}/")


LayersModelArg = Annotated[str, typer.Argument(help="Model name or specification (see --model).")]


@option_group(
    ModelOptions,
    only=("model", "weights", "random_weights", "size", "device"),
    types={"model": LayersModelArg},
)
def layers(model_options: ModelOptions) -> None:
    """List the model's layers with the output shape of each for a real input."""
    from convlens.layers import format_layer_table, layer_table

    net = model_options.load()
    crop = net.preprocess.crop
    rows = layer_table(net.net, torch.zeros(1, 3, crop, crop, device=net.device))
    out.print(format_layer_table(rows), markup=False, highlight=False, soft_wrap=True)
    if any(r.calls > 1 for r in rows):
        out.print(
            "Layers used several times in one forward pass can be chosen per call: "
            "--layer NAME@0 for the first call, NAME (or NAME@-1) for the last.",
            highlight=False,
            soft_wrap=True,
        )


def methods(
    options: Annotated[
        bool, typer.Option("--options", help="List each method's options, types and defaults.")
    ] = False,
) -> None:
    """List the explanation methods."""
    from convlens.methods import METHODS
    from convlens.methods.options import method_options

    if options:
        for name in METHODS:
            out.print(name, highlight=False, markup=False)
            lines = [f"  {name}.{k}  {v}" for k, v in method_options(name).items()]
            out.print("\n".join(lines or ["  (no options)"]), highlight=False, markup=False)
        return
    table = Table(show_edge=False)
    table.add_column("name")
    table.add_column("method")
    table.add_column("paper")
    table.add_column("layer")
    for name, cls in METHODS.items():
        table.add_row(name, cls.title, cls.paper, "yes" if cls.uses_layer else "")
    out.print(table)


DEMO_IMAGES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "astronaut": "astronaut"}
DEMO_MULTICLASS = "gradcam"
"""The method of the demo's multi-class view (written when a method with a multi-class view
is among those chosen)."""


@option_group(ModelOptions, only=("device",))
def demo(
    *,
    out_dir: OutDirOpt = Path("convlens-demo"),
    methods: MethodsOpt = "saliency,occlusion,cam,gradcam",
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            help="Classes in the multi-class view.",
            callback=checked(positive_int),
        ),
    ] = 3,
    model_options: ModelOptions,
) -> None:
    """Explain four sample photos bundled with scikit-image (nothing is downloaded)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from convlens.atomic import save_image

    names = parse_methods(methods)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for stem, fn in DEMO_IMAGES.items():
        path = img_dir / f"{stem}.png"
        save_image(Image.fromarray(np.asarray(getattr(skimage.data, fn)())), path)
        files.append(path)
    net = model_options.load()
    written = run_explain(net, files, out_dir, methods=names, batch_size=4)
    if multiclass_method(names) is not None:
        written += run_explain(
            net,
            files,
            out_dir / f"top{top_k}",
            methods=[DEMO_MULTICLASS],
            top_k=top_k,
            batch_size=4,
        )
    x = net.load_images(files).to(net.device)
    idx, probs = net.predict(x, k=1)
    for i, path in enumerate(files):
        say(f"{path.stem:>10}: {net.classes[int(idx[i, 0])]} ({float(probs[i, 0]):.2f})")
    say(f"wrote {len(written)} images to {out_dir}/ — open {out_dir}/cat_panel.png first")


def register(app: typer.Typer) -> None:
    """Add ``predict``, ``explain``, ``layers``, ``methods`` and ``demo`` to ``app``."""
    app.command()(predict)
    app.command("explain")(explain_cmd)
    app.command()(layers)
    app.command()(methods)
    app.command()(demo)
