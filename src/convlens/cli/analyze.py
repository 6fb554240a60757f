"""``convlens analyze``: error analysis over a labelled image set, with an HTML report."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from convlens.cli.options import (
    BatchSizeOpt,
    LabelledDataArg,
    LimitOpt,
    ModelOptions,
    WorkersOpt,
    checked,
    option_group,
    out,
    say,
)
from convlens.validate import non_negative_int

__all__ = ["register"]


@option_group(ModelOptions)
def analyze(
    data: LabelledDataArg,
    *,
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (reused to resume).")] = (
        Path("convlens-analysis")
    ),
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods (Grad-CAM is always included).")
    ] = "gradcam",
    method_option: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--method-option",
            "-o",
            help="A method's option as METHOD.OPTION=VALUE, e.g. occlusion.patch=16; "
            "repeat for more (`convlens methods --options` lists them).",
        ),
    ] = None,
    top_errors: Annotated[
        int,
        typer.Option(
            help="Most confident mistakes to explain.",
            callback=checked(non_negative_int),
        ),
    ] = 50,
    faithfulness: Annotated[
        bool,
        typer.Option(
            "--faithfulness/--no-faithfulness",
            help="Score each map of the explained mistakes (deletion/insertion AUC for the "
            "predicted class, against a random map; 79 extra forward passes per image for "
            "Grad-CAM alone, 38 more per further method).",
        ),
    ] = True,
    failure_modes: Annotated[
        bool,
        typer.Option(
            "--failure-modes/--no-failure-modes",
            help="Group the mistakes by the penultimate features of the prediction pass and "
            "rank the groups, with the channels that push each towards the wrong class "
            "(models ending in global average pooling and a linear layer).",
        ),
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="Where to run the prediction pass and the explanations: local (this process) "
            "or ray (a Ray cluster; pip install 'convlens[ray]'; docs/scale.md).",
        ),
    ] = "local",
    address: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="With --engine ray: the cluster to join (auto, or HOST:PORT of `ray start "
            "--head`); default: a new local one.",
        ),
    ] = None,
    decode_cpus: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="With --engine ray: CPUs of each decoding task (the decode fan-out: fewer "
            "CPUs each, more tasks at once); default 1 with GPUs, less on small CPU nodes.",
        ),
    ] = None,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = 0,
    limit: LimitOpt = None,
    model_options: ModelOptions,
) -> None:
    """Find where and why the model errs: metrics, calibration, explained mistakes."""
    from convlens.analysis import analyze as run_analysis
    from convlens.analysis.run import ENGINES
    from convlens.errors import InputError
    from convlens.methods.options import parse_method_options

    options = parse_method_options(method_option or [])
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r} is not one of: {', '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise InputError("--address is for --engine ray (the local engine joins no cluster)")
    net = model_options.load()
    result = run_analysis(
        net,
        data,
        out_dir,
        methods=methods,
        method_options=options,
        top_errors=top_errors,
        batch_size=batch_size,
        workers=workers,
        limit=limit,
        progress=True,
        faithfulness=faithfulness,
        failure_modes=failure_modes,
        engine=engine,
        address=address,
        decode_cpus=decode_cpus,
        # the workers rebuild the model from its options (the network is not pickled)
        model_spec=model_options.load if engine == "ray" else None,
    )
    m = result.metrics
    say(
        f"{m['images']} images ({m['labelled']} labelled, {m['failures']} unreadable): "
        f"top-1 {100 * m['top1']:.1f}%, top-5 {100 * m['top5']:.1f}%, ECE {m['ece']:.3f}",
        console=out,
    )
    for path, reason in result.failures[:10]:
        say(f"skipped {path}: {reason}")
    for path, reason in result.unexplained[:10]:
        say(f"not explained (unreadable now) {path}: {reason}")
    modes = m.get("failure_modes") or {}
    if modes.get("clusters"):
        top = modes["clusters"][0]
        pair = top["pairs"][0]
        say(
            f"failure modes: {len(modes['clusters'])} groups of mistakes; first: {top['errors']} "
            f"of {top['size']} images wrong (mostly {pair['true_name']} -> {pair['pred_name']})"
            + (", stands out" if top["stands_out"] else "; none stands out"),
            console=out,
        )
    say(f"report: {result.report}")


def register(app: typer.Typer) -> None:
    """Add the ``analyze`` command to ``app``."""
    app.command()(analyze)
