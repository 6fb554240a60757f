"""Command-line commands for image synthesis: ``classviz``, ``featviz`` and ``dream``.

Add them to a typer app with :func:`register` (:mod:`convlens.cli` does so for the
``convlens`` command). The commands only parse options, call :mod:`convlens.synthesis` and
write PNGs; user errors are raised as :class:`~convlens.errors.ConvlensError` for the CLI's
one-line report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from convlens.cli.options import (
    ModelOptions,
    OutDirOpt,
    checked,
    option_group,
    out,
    say,
)
from convlens.outputs import lock_folder
from convlens.targets import target_from_text
from convlens.validate import (
    at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from convlens.validate import seed as valid_seed

__all__ = ["SynthesisOptions", "parse_channels", "register"]

SynthesisSizeOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Model input size (centre crop); also the size of synthesised images."),
]
PresetOpt = Annotated[
    str,
    typer.Option(
        help="readable (default: Fourier, decorrelated colour, transforms), olah, "
        "simonyan (literal 2013 method), yosinski."
    ),
]
StepsOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        help="Optimisation steps (default: the preset's).",
        callback=checked(non_negative_int),
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        help="Random seed; the same seed gives the same images.",
        callback=checked(valid_seed),
    ),
]
LrOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(help="Learning rate (default: the preset's).", callback=checked(positive_float)),
]
SamplesOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        help="Random transform samples per image and step (default: the preset's).",
        callback=checked(positive_int),
    ),
]


@dataclass(frozen=True)
class SynthesisOptions:
    """The optimisation options of ``classviz`` and ``featviz``, as one argument (taken with
    ``@option_group(SynthesisOptions)``, see :func:`convlens.cli.options.option_group`)."""

    preset: PresetOpt = "readable"
    steps: StepsOpt = None
    seed: SeedOpt = 0
    lr: LrOpt = None
    samples: SamplesOpt = None

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~convlens.synthesis.class_visualization` and
        :func:`~convlens.synthesis.channel_visualization`: the preset and seed, and the
        preset's steps, learning rate and samples where the options override them."""
        overrides = {"steps": self.steps, "lr": self.lr, "samples": self.samples}
        return {
            "preset": self.preset,
            "seed": self.seed,
            **{k: v for k, v in overrides.items() if v is not None},
        }


# classviz and featviz: the model's input size is also the size of the synthesised images
SYNTHESIS_MODEL = (
    "model",
    "weights",
    "random_weights",
    "classes",
    "size",
    "mean",
    "std",
    "device",
)


def parse_channels(text: str) -> list[int]:
    """``--channels`` of ``featviz``: ``"0-15"``, ``"3,5,9"`` or ``"0-3,8,10-11"`` as a list
    of channel indices (:func:`convlens.features.browser.parse_channels` without ``auto``).

    Raises:
        InputError: not a list of non-negative integers and ranges.
    """
    from convlens.features.scan import parse_channels as parse

    chosen = parse(text, allow_auto=False)
    assert not isinstance(chosen, str)  # "auto" is refused above
    return chosen


@option_group(SynthesisOptions)
@option_group(ModelOptions, only=SYNTHESIS_MODEL, types={"size": SynthesisSizeOpt})
def classviz(
    *,
    target: Annotated[
        list[str],
        typer.Option(
            "--class",
            "-c",
            help="Class to visualise: index, name ('tabby cat') or synset; repeat for several "
            "(optimised together in one batch).",
        ),
    ],
    synthesis: SynthesisOptions,
    out_dir: OutDirOpt = Path("convlens-classviz"),
    model_options: ModelOptions,
) -> None:
    """Class model visualisation: the image that maximises a class score (Simonyan et al. 2013,
    with the regularisers of Olah et al. 2017). Writes one PNG per class and a grid."""
    from rich.table import Table

    from convlens.synthesis import class_visualization

    with lock_folder(out_dir, "classviz"):
        net = model_options.load()
        res = class_visualization(
            net,
            [target_from_text(t) for t in target],
            size=model_options.size,
            progress=True,
            **synthesis.settings(),
        )
        written = res.save(out_dir, prefix="classviz_")
        table = Table(show_edge=False)
        for col in ("class", "index", "logit", "probability", "file"):
            table.add_column(col, justify="left" if col in ("class", "file") else "right")
        probs = res.probabilities if res.probabilities is not None else res.scores
        for i, t in enumerate(res.targets):
            table.add_row(
                res.labels[i],
                str(t),
                f"{float(res.scores[i]):.2f}",
                f"{float(probs[i]):.3f}",
                written[i].name,
            )
        out.print(table)
        say(
            f"wrote {len(written)} images to {out_dir}/ ({res.steps_per_second:.2f} steps/s, "
            f"preset {synthesis.preset})"
        )


@option_group(SynthesisOptions)
@option_group(ModelOptions, only=SYNTHESIS_MODEL, types={"size": SynthesisSizeOpt})
def featviz(
    *,
    layer: Annotated[
        str, typer.Option(help="Layer (`convlens layers`); NAME@CALL for modules called often.")
    ],
    channels: Annotated[str, typer.Option(help="Channels: 0-15, 3,5,9 or 0-3,8.")] = "0-15",
    neuron: Annotated[
        bool, typer.Option(help="Maximise the centre unit of each channel, not its mean.")
    ] = False,
    synthesis: SynthesisOptions,
    out_dir: OutDirOpt = Path("convlens-featviz"),
    model_options: ModelOptions,
) -> None:
    """Channel visualisation: one image per channel of a layer that maximises its mean
    activation, all channels in one batch. Writes a grid PNG and one PNG per channel."""
    from convlens.synthesis import channel_visualization

    with lock_folder(out_dir, "featviz"):
        chans = parse_channels(channels)
        net = model_options.load()
        res = channel_visualization(
            net,
            layer,
            chans,
            neuron="center" if neuron else None,
            size=model_options.size,
            progress=True,
            **synthesis.settings(),
        )
        stem = "".join(c if c.isalnum() else "_" for c in layer)
        written = res.save(out_dir, prefix=f"featviz_{stem}_")
        say(
            f"wrote {written[-1]} and {len(written) - 1} channel images to {out_dir}/ "
            f"({res.steps_per_second:.2f} steps/s)"
        )


@option_group(ModelOptions, only=("model", "weights", "random_weights", "mean", "std", "device"))
def dream(
    image: Annotated[Path, typer.Argument(help="The photo to dream on.")],
    *,
    layer: Annotated[
        str, typer.Option(help="Layer whose activations are amplified (`convlens layers`).")
    ],
    channel: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Amplify only this channel of the layer.",
            callback=checked(non_negative_int),
        ),
    ] = None,
    octaves: Annotated[
        int, typer.Option(help="Number of scales.", callback=checked(positive_int))
    ] = 4,
    octave_scale: Annotated[
        float,
        typer.Option(
            help="Size ratio between scales (1 or more).",
            callback=checked(lambda v, n: at_least(v, n, 1.0)),
        ),
    ] = 1.4,
    steps: Annotated[
        int,
        typer.Option(help="Gradient steps per octave.", callback=checked(non_negative_int)),
    ] = 10,
    step_size: Annotated[
        float,
        typer.Option(
            help="Mean pixel change per step ([0, 1] pixel units).",
            callback=checked(positive_float),
        ),
    ] = 0.01,
    jitter: Annotated[
        int,
        typer.Option(
            help="Largest random roll per step (pixels).",
            callback=checked(non_negative_int),
        ),
    ] = 32,
    max_size: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Shrink the photo so that its longer side is at most this.",
            callback=checked(positive_int),
        ),
    ] = 512,
    gif: Annotated[bool, typer.Option(help="Also write an animated GIF of the steps.")] = False,
    seed: SeedOpt = 0,
    out_dir: OutDirOpt = Path("convlens-dream"),
    model_options: ModelOptions,
) -> None:
    """DeepDream (Mordvintsev et al. 2015): amplify what a layer sees in a photo, over several
    octaves. Writes IMAGE_dream.png (and IMAGE_dream.gif with --gif)."""
    from convlens.images import load_image
    from convlens.outputs import claim_output_stems
    from convlens.synthesis import deep_dream

    photo = load_image(image)
    net = model_options.load()
    with lock_folder(out_dir, "dream"):  # IMAGE-HASH_dream.png if IMAGE_dream.png is taken
        stem = claim_output_stems(out_dir, [image], lambda s: f"{s}_dream.png")[0]
        gif_path = out_dir / f"{stem}_dream.gif" if gif else None
        res = deep_dream(
            net,
            photo,
            layer,
            channel=channel,
            octaves=octaves,
            octave_scale=octave_scale,
            steps_per_octave=steps,
            step_size=step_size,
            jitter=jitter,
            max_size=max_size,
            seed=seed,
            gif_path=gif_path,
            progress=True,
        )
        path = res.save(out_dir / f"{stem}_dream.png")
    extra = f" and {gif_path}" if gif_path is not None else ""
    say(f"wrote {path}{extra} ({len(res.octave_sizes)} octaves, {res.seconds:.1f} s)")


def register(app: typer.Typer) -> None:
    """Add the ``classviz``, ``featviz`` and ``dream`` commands to ``app``."""
    app.command("classviz")(classviz)
    app.command("featviz")(featviz)
    app.command("dream")(dream)
