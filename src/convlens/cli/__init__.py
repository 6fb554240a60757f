"""The ``convlens`` command line: thin wrappers over the public API.

Every user error is reported as one line on stderr with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from convlens.accel.allocator import keep_freed_memory
from convlens.cli_options import (
    BatchSizeOpt,
    ClassesOpt,
    DeviceOpt,
    ImagesArg,
    LimitOpt,
    MeanOpt,
    MethodsOpt,
    ModelOpt,
    OutDirOpt,
    PlainOpt,
    ResizeOpt,
    SizeOpt,
    StdOpt,
    WeightsOpt,
    WorkersOpt,
    checked,
    fail,
    load_net,
    out,
    parse_methods,
    progress_bar,
    say,
    show_warning,
)
from convlens.errors import ConvlensError, ImageError, InputError
from convlens.validate import fraction, int_text, positive_int

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer, on click
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

app = typer.Typer(
    name="convlens",
    help="See what a convolutional image classifier looks at, and why it gets images wrong.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("convlens")


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


@app.command()
def predict(
    images: ImagesArg,
    model: ModelOpt = "lite0",
    weights: WeightsOpt = None,
    classes: ClassesOpt = None,
    size: SizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    top: Annotated[
        int,
        typer.Option(help="Number of classes to show.", callback=checked(positive_int, "--top")),
    ] = 5,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "cpu",
) -> None:
    """Show the top classes the model predicts for each image."""
    files = _some_images(images)
    net = load_net(model, weights, classes, size, resize, mean, std, device)
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
    if text is None:
        return None
    number = int_text(text)
    return text if number is None else number


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
    """
    from convlens.api import explain
    from convlens.atomic import save_image
    from convlens.hooks import named_module
    from convlens.outputs import claim_output_stems, lock_folder
    from convlens.render import multiclass_figure, save_figure, side_by_side_figure

    if layer is not None:
        named_module(model_obj.net, layer.rpartition("@")[0] or layer)
    written: list[Path] = []
    multi = (
        "gradcam"
        if "gradcam" in methods
        else next((m for m in methods if m in ("cam", "gradcam++")), None)
    )
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


@app.command("explain")
def explain_cmd(
    images: ImagesArg,
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
            callback=checked(positive_int, "--top-k"),
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
    model: ModelOpt = "lite0",
    weights: WeightsOpt = None,
    classes: ClassesOpt = None,
    size: SizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 8,
    patch: Annotated[
        int,
        typer.Option(
            help="Occlusion patch size (pixels).", callback=checked(positive_int, "--patch")
        ),
    ] = 32,
    stride: Annotated[
        int,
        typer.Option(help="Occlusion stride (pixels).", callback=checked(positive_int, "--stride")),
    ] = 16,
    fill: Annotated[str, typer.Option(help="Occlusion fill: mean, blur, zero or a number.")] = (
        "mean"
    ),
    cmap: Annotated[str, typer.Option(help="Matplotlib colour map.", callback=_check_cmap)] = "jet",
    alpha: Annotated[
        float, typer.Option(help="Heatmap opacity.", callback=checked(fraction, "--alpha"))
    ] = 0.5,
    device: DeviceOpt = "cpu",
    plain: PlainOpt = False,
) -> None:
    """Explain predictions: one side-by-side panel per image plus one overlay per method."""
    from convlens.methods.options import build_methods

    names = parse_methods(methods)
    files = _some_images(images)
    net = load_net(model, weights, classes, size, resize, mean, std, device, plain=plain)
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


@app.command()
def layers(
    model: Annotated[str, typer.Argument(help="Model name or specification (see --model).")] = (
        "lite0"
    ),
    weights: WeightsOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """List the model's layers with the output shape of each for a real input."""
    from convlens.layers import format_layer_table, layer_table

    net = load_net(model, weights=weights, size=size, device=device)
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


@app.command()
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


@app.command()
def demo(
    out_dir: OutDirOpt = Path("convlens-demo"),
    methods: MethodsOpt = "saliency,occlusion,cam,gradcam",
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            help="Classes in the multi-class view.",
            callback=checked(positive_int, "--top-k"),
        ),
    ] = 3,
    device: DeviceOpt = "cpu",
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
    net = load_net("lite0", device=device)
    written = run_explain(net, files, out_dir, methods=names, batch_size=4)
    if "gradcam" in names or "cam" in names:
        written += run_explain(
            net, files, out_dir / f"top{top_k}", methods=["gradcam"], top_k=top_k, batch_size=4
        )
    x = net.load_images(files).to(net.device)
    idx, probs = net.predict(x, k=1)
    for i, path in enumerate(files):
        say(f"{path.stem:>10}: {net.classes[int(idx[i, 0])]} ({float(probs[i, 0]):.2f})")
    say(f"wrote {len(written)} images to {out_dir}/ — open {out_dir}/cat_panel.png first")


@app.command("features")
def features_cmd(
    data: Annotated[
        list[str], typer.Argument(help="Image folders (searched recursively) or files.")
    ],
    layer: Annotated[
        list[str],
        typer.Option(
            "--layer",
            help="Layer to browse (repeatable; `convlens layers`); name@call for modules "
            "called several times.",
        ),
    ],
    channels: Annotated[
        str,
        typer.Option(help="Channels: 'auto' (the most active), a range '0-15', a list '0,3,7'."),
    ] = "auto",
    num_channels: Annotated[
        int,
        typer.Option(
            help="Channels picked by --channels auto.",
            callback=checked(positive_int, "--num-channels"),
        ),
    ] = 16,
    top: Annotated[
        int,
        typer.Option(
            help="Strongest activations (images) per channel.",
            callback=checked(positive_int, "--top"),
        ),
    ] = 9,
    rule: Annotated[
        str,
        typer.Option(help="Projection: deconvnet (Zeiler & Fergus) or guided (backprop)."),
    ] = "deconvnet",
    crop: Annotated[
        str,
        typer.Option(
            help="Patches: 'effective' (the part of the receptive field holding 90% of the "
            "projection) or 'field' (the whole receptive field)."
        ),
    ] = "effective",
    out_dir: OutDirOpt = Path("convlens-features"),
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 0,
    limit: LimitOpt = None,
    model: ModelOpt = "lite0",
    weights: WeightsOpt = None,
    classes: ClassesOpt = None,
    size: SizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """What each channel responds to: its top images, patches and projections (Zeiler & Fergus).

    Writes one grid PNG per layer and an index.html that works offline.
    """
    from convlens.architecture import parse_layer
    from convlens.features.browser import parse_channels, render_features, scan_features
    from convlens.hooks import named_module
    from convlens.images import list_images
    from convlens.outputs import check_out_dir

    spec = parse_channels(channels)
    check_out_dir(out_dir)  # before the scan, not after it
    if rule not in ("deconvnet", "guided"):
        raise InputError(f"--rule must be 'deconvnet' or 'guided', got {rule!r}")
    if crop not in ("effective", "field"):
        raise InputError(f"--crop must be 'effective' or 'field', got {crop!r}")
    files = list_images(data)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise InputError(f"no images found in {', '.join(str(d) for d in data)}")
    net = load_net(model, weights, classes, size, resize, mean, std, device)
    for name in layer:
        named_module(net.net, parse_layer(name).name)  # a bad name fails before the scan
    bar = progress_bar()
    tasks: dict[str, int] = {}

    def report(what: str) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        return update

    with bar:  # cleared if the scan or the rendering fails
        scan = scan_features(
            net,
            files,
            layer,
            spec,
            top=top,
            num_channels=num_channels,
            batch_size=batch_size,
            workers=workers,
            progress=report("scanning"),
        )
        written = render_features(
            scan,
            net,
            out_dir,
            rule=rule,
            crop=crop,  # type: ignore[arg-type]
            batch_size=batch_size,
            progress=report("rendering"),
        )
    skipped = f", skipped {len(scan.skipped)} unreadable" if scan.skipped else ""
    say(
        f"scanned {scan.scanned} images{skipped}; wrote {len(written) - 1} grid(s) to "
        f"{out_dir}/ — open {out_dir / 'index.html'}"
    )


def _register_commands() -> None:
    """Commands kept in their own modules, each adding itself to ``app``."""
    from convlens.cli_analyze import register as register_analyze
    from convlens.cli_evaluate import register as register_evaluate
    from convlens.cli_synthesis import register as register_synthesis

    register_evaluate(app)
    register_analyze(app)
    register_synthesis(app)


_register_commands()


def _usage_message(exc: Exception, args: Sequence[str]) -> str:
    """A click usage error as one line, with the ``--help`` to run."""
    text = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None)
    if not command:  # some parser errors carry no context: name the command given, if any
        first = next((a for a in args if not a.startswith("-")), None)
        command = f"convlens {first}" if first in _app_commands() else "convlens"
    return f"{text} (see '{command} --help')"


def _app_commands() -> set[str]:
    """The names of the ``convlens`` commands."""
    return {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: runs the app, turning user errors into one-line messages.

    A bad option or argument (not a number, unknown, missing) and every
    :class:`~convlens.errors.ConvlensError` print one ``error: ...`` line on stderr and exit with
    code 2; ``--help`` (and no arguments at all) print the help. ``--debug`` re-raises instead,
    showing the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    # The command owns its process: keep freed activation memory for reuse (CPU forward passes
    # ~2-3x faster, see convlens.accel.allocator).
    keep_freed_memory()
    shown, warnings.showwarning = warnings.showwarning, show_warning  # one "warning:" line
    try:
        code = _run(args, debug)
    finally:
        warnings.showwarning = shown
    sys.exit(code)


def _run(args: list[str], debug: bool) -> int:
    """Run the app; the exit code (user errors printed as one line)."""
    try:
        # standalone_mode=False: click's errors reach us instead of printing a usage box.
        code = app(args=args, prog_name="convlens", standalone_mode=False)
    except (ConvlensError, OSError) as exc:
        if debug:
            raise
        fail(str(exc))
        return 2
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `convlens` alone: the help, as before
            help_text = exc.format_message()
            if help_text.strip():  # typer with rich has printed it already
                out.print(help_text, soft_wrap=True)
            return 2
        if debug:
            raise
        fail(_usage_message(exc, args))
        return 2
    except ClickException as exc:
        if debug:
            raise
        fail(_usage_message(exc, args))
        return 2
    except typer.Abort:
        fail("aborted")
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
