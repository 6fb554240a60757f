"""The analysis run: streaming inference into the store, metrics, explanations of the errors.

:func:`analyze` is resumable: images already in ``RUN_DIR/predictions.sqlite`` (predicted or
recorded as unreadable) are skipped, and explanation panels already under
``RUN_DIR/explanations/`` are not recomputed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from convlens.analysis.report import write_report
from convlens.analysis.stats import (
    compute_metrics,
    confidence_histogram_figure,
    confusion_figure,
    reliability_figure,
)
from convlens.analysis.store import Prediction, PredictionStore, image_id
from convlens.errors import ConvlensError, InputError
from convlens.models.base import ConvlensModel
from convlens.models.preprocess import Preprocess

__all__ = ["AnalysisResult", "analyze", "select_examined"]

log = logging.getLogger(__name__)

STORE_NAME = "predictions.sqlite"
THUMB_SIDE = 96
_PAIR_EXAMPLES = 2
_PAIRS = 5


@dataclass
class AnalysisResult:
    """What :func:`analyze` produced.

    Attributes:
        out_dir: the run folder.
        metrics: aggregate metrics (see :func:`~convlens.analysis.stats.compute_metrics`).
        predictions: every stored prediction.
        failures: ``(path, reason)`` of the unreadable images.
        class_names: name of each class index.
        explanations: image id -> explanation panel (PNG) of the examined images.
        report: the report's ``index.html``.
    """

    out_dir: Path
    metrics: dict[str, Any]
    predictions: list[Prediction]
    failures: list[tuple[str, str]]
    class_names: list[str]
    explanations: dict[str, Path] = field(default_factory=dict)
    report: Path | None = None

    def table(self) -> list[dict[str, Any]]:
        """One dict per image: id, path, label, names, confidence, loss, correct, top-5."""
        names = self.class_names
        return [
            {
                "id": p.id,
                "path": p.path,
                "label": p.label,
                "label_name": None if p.label is None else names[p.label],
                "pred": p.pred,
                "pred_name": names[p.pred],
                "confidence": p.confidence,
                "loss": p.loss,
                "correct": p.correct,
                "top5": list(p.top5),
                "probs5": list(p.probs5),
                "explanation": str(self.explanations[p.id]) if p.id in self.explanations else None,
            }
            for p in self.predictions
        ]

    def dataframe(self) -> Any:
        """:meth:`table` as a ``pandas.DataFrame``.

        Raises:
            ImportError: pandas is not installed.
        """
        import pandas as pd

        return pd.DataFrame(self.table())


class _ImageSet(Dataset):
    """Reads and preprocesses one image per item; unreadable ones come back as a reason."""

    def __init__(
        self, items: Sequence[tuple[str, int | None]], preprocess: Preprocess, thumbs: Path
    ) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.thumbs = thumbs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        from convlens.images import load_image

        path = self.items[i][0]
        try:
            image = load_image(path)
            x = self.preprocess(image)
        except (ConvlensError, OSError) as exc:
            return i, None, str(exc)
        thumb = self.thumbs / f"{image_id(path)}.jpg"
        if not thumb.exists():
            small = image.copy()
            small.thumbnail((THUMB_SIDE, THUMB_SIDE))
            small.save(thumb, quality=85)
        return i, x, ""


def _collate(
    batch: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason) for i, x, reason in batch if x is None]
    x = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], x, failed


def _progress(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _predict_batch(
    model: ConvlensModel, x: torch.Tensor, paths: list[str], labels: list[int | None]
) -> list[Prediction]:
    from convlens.hooks import model_state

    with model_state(model.net, eval_mode=True, grads=False), torch.no_grad():
        logits = model.net(x.to(model.device)).float().cpu()
    log_probs = torch.log_softmax(logits, dim=1)
    top = log_probs.exp().topk(min(5, logits.shape[1]), dim=1)
    out = []
    for b, (path, label) in enumerate(zip(paths, labels, strict=True)):
        top5 = tuple(int(c) for c in top.indices[b])
        out.append(
            Prediction(
                id=image_id(path),
                path=path,
                label=label,
                top5=top5,
                probs5=tuple(float(p) for p in top.values[b]),
                loss=None if label is None else float(-log_probs[b, label]),
                correct=None if label is None else top5[0] == label,
            )
        )
    return out


def _infer(
    model: ConvlensModel,
    store: PredictionStore,
    items: Sequence[tuple[str, int | None]],
    *,
    thumbs: Path,
    batch_size: int,
    workers: int,
    progress: bool,
) -> None:
    """Predict the items not yet in the store, one transaction per batch."""
    done = store.finished_paths()
    todo = [(p, lbl) for p, lbl in items if p not in done]
    if len(todo) < len(items):
        log.info("resuming: %d of %d images already done", len(items) - len(todo), len(items))
    if not todo:
        return
    loader = DataLoader(
        _ImageSet(todo, model.preprocess, thumbs),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    with _progress(progress) as bar:
        task = bar.add_task("predicting", total=len(todo)) if bar is not None else None
        for idx, x, failed in loader:
            preds = []
            if x is not None:
                preds = _predict_batch(
                    model, x, [todo[i][0] for i in idx], [todo[i][1] for i in idx]
                )
            store.add_batch(preds, [(todo[i][0], reason) for i, reason in failed])
            for i, reason in failed:
                log.warning("skipped %s: %s", todo[i][0], reason)
            if bar is not None:
                bar.advance(task, len(idx) + len(failed))


def select_examined(
    predictions: Sequence[Prediction],
    metrics: dict[str, Any],
    top_errors: int,
) -> list[Prediction]:
    """The images whose mistakes get explained.

    The ``top_errors`` most confident mistakes, then up to 2 of the most confident examples of
    each of the 5 most confused (true, predicted) pairs that are not already among them.
    """
    wrong = sorted((p for p in predictions if p.correct is False), key=lambda p: -p.confidence)
    chosen = {p.id: p for p in wrong[: max(0, top_errors)]}
    for pair in metrics["confused_pairs"][:_PAIRS]:
        examples = [p for p in wrong if p.label == pair["true"] and p.pred == pair["pred"]]
        for p in examples[:_PAIR_EXAMPLES]:
            chosen.setdefault(p.id, p)
    return list(chosen.values())


def _explain_errors(
    model: ConvlensModel,
    examined: Sequence[Prediction],
    methods: Sequence[str],
    out: Path,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, Path]:
    """Side-by-side panels (predicted vs true class) of each examined image, cached as PNGs."""
    from convlens.api import explain
    from convlens.render import save_figure, side_by_side_figure

    files = {p.id: out / f"{p.id}.png" for p in examined}
    todo = [p for p in examined if not files[p.id].exists()]
    if todo:
        with _progress(progress) as bar:
            task = bar.add_task("explaining errors", total=len(todo)) if bar else None
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                x = model.load_images([p.path for p in chunk]).to(model.device)
                pred = torch.tensor([p.pred for p in chunk], device=model.device)
                true = torch.tensor([int(p.label or 0) for p in chunk], device=model.device)
                by_pred = explain(model, x, list(methods), target=pred)
                by_true = explain(model, x, list(methods), target=true)
                for i, p in enumerate(chunk):
                    panels = {}
                    for m in by_pred:
                        panels[f"{m}: predicted"] = by_pred[m]
                        panels[f"{m}: true"] = by_true[m]
                    fig = side_by_side_figure(panels, i)
                    save_figure(fig, files[p.id])
                    fig.clear()
                if bar is not None:
                    bar.advance(task, len(chunk))
    return files


def _method_names(methods: str | Sequence[str]) -> list[str]:
    from convlens.methods import get_method

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names = ["gradcam", *[m for m in methods if m != "gradcam"]]
    for name in names:
        get_method(name)  # raises a clear error for unknown names, before any work
    return names


def analyze(
    model: ConvlensModel,
    data: str | Path,
    out_dir: str | Path,
    *,
    methods: str | Sequence[str] = ("gradcam",),
    top_errors: int = 50,
    batch_size: int = 32,
    workers: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Error analysis of a classifier over a labelled image set, with a browsable report.

    Predictions stream into ``out_dir/predictions.sqlite`` (one transaction per batch; a rerun
    skips finished and previously failed images); metrics and plots are computed from the store;
    the most confident mistakes are explained for the predicted and the true class; the report
    is written to ``out_dir/report/index.html``.

    Args:
        model: the classifier (see :func:`~convlens.load_model`).
        data: class folders (named by class name or synset) or a CSV with ``path,label``.
        out_dir: the run folder (created; reused to resume).
        methods: explanation methods (names or comma-separated); Grad-CAM is always included.
        top_errors: number of most confident mistakes to explain.
        batch_size: images per forward pass and per explanation batch.
        workers: DataLoader worker processes for reading images.
        limit: use at most this many images (in sorted order).
        progress: show rich progress bars on stderr.

    Returns:
        The :class:`AnalysisResult`.

    Raises:
        InputError: no images found, bad arguments, or ``out_dir`` holds a run of a model with
            a different number of classes.
    """
    if batch_size < 1 or workers < 0:
        raise InputError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    from convlens.data import read_labelled

    names = _method_names(methods)
    out = Path(out_dir)
    items = [(str(p), lbl) for p, lbl in read_labelled(data, model.classes, limit=limit)]
    if not items:
        raise InputError(f"no images found in {data}")
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    class_names = [model.classes[i] for i in range(len(model.classes))]
    with PredictionStore(out / STORE_NAME) as store:
        meta = store.meta()
        if meta.get("num_classes", len(class_names)) != len(class_names):
            raise InputError(
                f"{out} holds a run of a model with {meta['num_classes']} classes, this one has "
                f"{len(class_names)}; give another --out folder"
            )
        store.set_meta(model=model.name, num_classes=len(class_names), data=str(data))
        _infer(
            model,
            store,
            items,
            thumbs=thumbs,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
        )
        wanted = {p for p, _ in items}
        predictions = [p for p in store.predictions() if p.path in wanted]
        failures = [f for f in store.failures() if f[0] in wanted]
    metrics = compute_metrics(predictions, class_names, failures=len(failures))
    metrics["model"] = model.name
    metrics["methods"] = names
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from convlens.render import save_figure

    plots = out / "plots"
    for name, fig in (
        ("reliability", reliability_figure(metrics)),
        ("confidence", confidence_histogram_figure(predictions)),
        ("confusion", confusion_figure(metrics)),
    ):
        save_figure(fig, plots / f"{name}.png")
    examined = select_examined(predictions, metrics, top_errors)
    files = _explain_errors(
        model, examined, names, out / "explanations", batch_size=batch_size, progress=progress
    )
    result = AnalysisResult(
        out_dir=out,
        metrics=metrics,
        predictions=predictions,
        failures=failures,
        class_names=class_names,
        explanations=files,
    )
    result.report = write_report(result, [p.id for p in examined])
    return result
