"""``convlens evaluate``: faithfulness metrics and sanity checks over an image set."""

import csv
from pathlib import Path
from typing import Annotated

import typer

from convlens.cli.options import (
    BatchSizeOpt,
    LabelledDataArg,
    LimitOpt,
    MethodsOpt,
    ModelOptions,
    OutDirOpt,
    checked,
    option_group,
    parse_methods,
    progress_bar,
    say,
    status,
)
from convlens.console import printable
from convlens.errors import InputError
from convlens.outputs import lock_folder
from convlens.validate import positive_int

__all__ = ["register"]


@option_group(ModelOptions)
def evaluate(
    data: LabelledDataArg,
    *,
    methods: MethodsOpt = "gradcam,saliency,occlusion",
    out_dir: OutDirOpt = Path("convlens-eval"),
    limit: LimitOpt = None,
    steps: Annotated[
        int,
        typer.Option(
            help="Deletion/insertion steps (20: 5% of the pixels per step).",
            callback=checked(positive_int),
        ),
    ] = 20,
    batch_size: BatchSizeOpt = 8,
    sanity: Annotated[bool, typer.Option(help="Also run cascading randomisation.")] = False,
    compile_model: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Run the long no-grad forward passes compiled by torch.compile. Default: "
            "automatic, on a CPU for batches of many passes (convlens.accel.AUTO_COMPILE_PASSES); "
            "never with --plain.",
        ),
    ] = None,
    sanity_images: Annotated[
        int,
        typer.Option(help="Images used by --sanity.", callback=checked(positive_int)),
    ] = 4,
    use_labels: Annotated[
        bool, typer.Option(help="Explain the true label (else the top-1 class).")
    ] = False,
    model_options: ModelOptions,
) -> None:
    """Score methods with deletion/insertion, Average Drop and sanity checks."""
    import torch

    from convlens.atomic import atomic_path, atomic_write_text
    from convlens.data import read_labelled
    from convlens.metrics import EvaluationTable, cascading_randomization, evaluate_methods
    from convlens.render import save_figure

    with lock_folder(out_dir, "evaluate"):
        names = parse_methods(methods)
        net = model_options.load()
        items = read_labelled(data, net.classes, limit=limit)
        if not items:
            raise InputError(f"no images found in {data}")
        out_dir.mkdir(parents=True, exist_ok=True)
        table = EvaluationTable()
        files: list[Path] = []
        with progress_bar() as bar:
            task = bar.add_task("evaluating", total=len(items))
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                x = net.load_images([p for p, _ in chunk]).to(net.device)
                targets = None
                if use_labels and all(lbl is not None for _, lbl in chunk):
                    targets = torch.tensor([lbl for _, lbl in chunk], device=net.device)
                evaluate_methods(
                    net,
                    x,
                    names,
                    targets=targets,
                    steps=steps,
                    table=table,
                    compile=compile_model,
                )
                files += [p for p, _ in chunk]
                bar.advance(task, len(chunk))
        md = [
            f"# convlens evaluate: {printable(data)}",
            "",
            f"{len(files)} images, model {net.name}, {steps} deletion/insertion steps.",
            "",
            table.markdown(),
            "",
        ]
        with (
            atomic_path(out_dir / "metrics.csv") as tmp,
            tmp.open("x", newline="", encoding="utf-8") as fh,
        ):
            writer = csv.writer(fh)
            cols = sorted({c for row in table.per_image.values() for c in row})
            writer.writerow(["image", "method", *cols])
            for method, row in table.per_image.items():
                for i, path in enumerate(files):
                    cells = (f"{float(row[c][i]):.5f}" for c in cols)
                    writer.writerow([printable(str(path)), method, *cells])
        save_figure(_curves_figure(table), out_dir / "curves.png")
        if sanity:
            k = min(sanity_images, len(items))
            x = net.load_images([p for p, _ in items[:k]]).to(net.device)
            with status("sanity checks (cascading randomisation) ..."):
                res = cascading_randomization(net, x, names)
            save_figure(res.figure(), out_dir / "sanity.png")
            md += [
                "## Sanity checks (Adebayo et al. 2018)",
                "",
                f"Cascading randomisation on {k} images; mean similarity to the original "
                "maps after randomising down to each layer (1 = unchanged: the method ignores "
                "the weights).",
                "",
                "| method | metric | " + " | ".join(res.steps) + " |",
                "|---|---|" + "---:|" * len(res.steps),
            ]
            for method in res.scores:
                for metric in ("spearman_abs", "ssim", "hog"):
                    vals = " | ".join(f"{v:.2f}" for v in res.mean(method, metric))
                    md.append(f"| {method} | {metric} | {vals} |")
        atomic_write_text(out_dir / "metrics.md", "\n".join(md) + "\n")
        say(
            f"wrote {out_dir}/metrics.md, metrics.csv, curves.png"
            + (", sanity.png" if sanity else "")
        )


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""
    app.command("evaluate")(evaluate)


def _curves_figure(table):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_del, ax_ins = fig.subplots(1, 2)
    for name, curves in table.curves.items():
        style = "--" if name.startswith("(") else "-"
        ax_del.plot(curves.fractions, curves.deletion.mean(0), style, label=name)
        ax_ins.plot(curves.fractions, curves.insertion.mean(0), style, label=name)
    ax_del.set_title("deletion (lower is better)")
    ax_ins.set_title("insertion (higher is better)")
    for ax in (ax_del, ax_ins):
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("target probability")
    ax_ins.legend(fontsize=8)
    return fig
