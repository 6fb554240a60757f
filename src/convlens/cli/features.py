"""``convlens features``: what each channel of a layer responds to, as an offline browser."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from convlens.cli.options import (
    LOADING,
    BatchSizeOpt,
    LimitOpt,
    ModelOptions,
    OutDirOpt,
    WorkersOpt,
    checked,
    option_group,
    progress_bar,
    say,
)
from convlens.console import progress_callback
from convlens.errors import InputError
from convlens.validate import positive_int

if TYPE_CHECKING:
    from convlens.models.base import ConvlensModel

__all__ = ["register"]


@option_group(ModelOptions, only=LOADING)
def features_cmd(
    data: Annotated[
        list[str], typer.Argument(help="Image folders (searched recursively) or files.")
    ],
    *,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer",
            help="Layer to browse (repeatable; `convlens layers`); name@call for modules "
            "called several times. Default: the layer Grad-CAM uses (the last convolutional "
            "map; for a vision transformer, a token layer of its last block).",
        ),
    ] = None,
    channels: Annotated[
        str,
        typer.Option(help="Channels: 'auto' (the most active), a range '0-15', a list '0,3,7'."),
    ] = "auto",
    num_channels: Annotated[
        int,
        typer.Option(
            help="Channels picked by --channels auto.",
            callback=checked(positive_int),
        ),
    ] = 16,
    top: Annotated[
        int,
        typer.Option(
            help="Strongest activations (images) per channel.",
            callback=checked(positive_int),
        ),
    ] = 9,
    rule: Annotated[
        str,
        typer.Option(
            help="Projection: deconvnet (Zeiler & Fergus) or guided (backprop). Token layers of "
            "vision transformers always show the input gradient."
        ),
    ] = "deconvnet",
    crop: Annotated[
        str,
        typer.Option(
            help="Patches: 'effective' (the part of the receptive field holding 90% of the "
            "projection) or 'field' (the whole receptive field). Token layers: each token's "
            "grid cell."
        ),
    ] = "effective",
    out_dir: OutDirOpt = Path("convlens-features"),
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 0,
    limit: LimitOpt = None,
    model_options: ModelOptions,
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
    net = model_options.load()
    if not layer:
        layer = [_default_layer(net)]
        say(f"layer {layer[0]} (the default; choose others with --layer)")
    for name in layer:
        named_module(net.net, parse_layer(name).name)  # a bad name fails before the scan
    with progress_bar() as bar:  # cleared if the scan or the rendering fails
        scan = scan_features(
            net,
            files,
            layer,
            spec,
            top=top,
            num_channels=num_channels,
            batch_size=batch_size,
            workers=workers,
            progress=progress_callback(bar, "scanning"),
        )
        written = render_features(
            scan,
            net,
            out_dir,
            rule=rule,
            crop=crop,  # type: ignore[arg-type]
            batch_size=batch_size,
            progress=progress_callback(bar, "rendering"),
        )
    skipped = f", skipped {len(scan.skipped)} unreadable" if scan.skipped else ""
    say(
        f"scanned {scan.scanned} images{skipped}; wrote {len(written) - 1} grid(s) to "
        f"{out_dir}/ — open {out_dir / 'index.html'}"
    )


def _default_layer(model: ConvlensModel) -> str:
    """The layer the CAM family uses by default (:func:`convlens.architecture.default_layer`),
    found on a blank image of the model's input size: the last convolutional map of a CNN, a
    token layer of the last block of a vision transformer."""
    import torch

    from convlens.architecture import default_layer
    from convlens.features.scan import _param

    device, dtype = _param(model.net)
    size = model.preprocess.crop
    return str(default_layer(model.net, torch.zeros(1, 3, size, size, device=device, dtype=dtype)))


def register(app: typer.Typer) -> None:
    """Add the ``features`` command to ``app``."""
    app.command("features")(features_cmd)
