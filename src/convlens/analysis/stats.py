"""Aggregate metrics of a run, computed from the stored predictions, and their plots.

All functions take plain sequences (of :class:`~convlens.analysis.store.Prediction` or numbers)
and return plain Python values, so the report and the tests read them directly. Plots use the
matplotlib object API (``Figure`` on an Agg canvas), never ``pyplot``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from convlens.analysis.store import Prediction
from convlens.console import plot_label

__all__ = [
    "ECE_BINS",
    "calibration_bins",
    "compute_metrics",
    "confidence_histogram_figure",
    "confused_pairs",
    "confusion_figure",
    "confusion_matrix",
    "expected_calibration_error",
    "per_class_metrics",
    "reliability_figure",
]

ECE_BINS = 15
"""Number of equal-width confidence bins of the expected calibration error."""


def _bin_index(confidence: float, bins: int) -> int:
    """Bin ``k`` holds confidences in ``(k / bins, (k + 1) / bins]``; 0 goes to bin 0."""
    return min(bins - 1, max(0, math.ceil(confidence * bins) - 1))


def calibration_bins(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per-bin count, mean confidence and accuracy over equal-width bins of (0, 1].

    Args:
        confidences: top-1 probability of each prediction.
        correct: whether each prediction was right.
        bins: number of bins.

    Returns:
        One dict per bin with ``lo``, ``hi``, ``count``, ``confidence`` and ``accuracy`` (the
        last two are 0 for empty bins).

    Raises:
        ValueError: the sequences differ in length or ``bins < 1``.
    """
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    count = [0] * bins
    conf_sum = [0.0] * bins
    right = [0] * bins
    for c, ok in zip(confidences, correct, strict=True):
        k = _bin_index(float(c), bins)
        count[k] += 1
        conf_sum[k] += float(c)
        right[k] += int(bool(ok))
    return [
        {
            "lo": k / bins,
            "hi": (k + 1) / bins,
            "count": count[k],
            "confidence": conf_sum[k] / count[k] if count[k] else 0.0,
            "accuracy": right[k] / count[k] if count[k] else 0.0,
        }
        for k in range(bins)
    ]


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> float:
    """Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks").

    ``ECE = sum_k |B_k| / n * |acc(B_k) - conf(B_k)|`` over equal-width bins ``B_k`` of the
    top-1 confidence.

    Args:
        confidences: top-1 probability of each prediction.
        correct: whether each prediction was right.
        bins: number of bins (15 by default).

    Returns:
        The ECE in [0, 1]; 0 for an empty set.
    """
    n = len(confidences)
    if n == 0:
        return 0.0
    table = calibration_bins(confidences, correct, bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table)


def per_class_metrics(
    labels: Sequence[int], preds: Sequence[int], classes: Sequence[int]
) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each class (0 where undefined).

    Args:
        labels: true class of each image.
        preds: top-1 class of each image.
        classes: the classes to report, in order.

    Returns:
        One dict per class: ``class``, ``precision``, ``recall``, ``f1``, ``support``.
    """
    tp: Counter[int] = Counter()
    n_pred: Counter[int] = Counter(preds)
    n_true: Counter[int] = Counter(labels)
    for t, p in zip(labels, preds, strict=True):
        if t == p:
            tp[t] += 1
    out = []
    for c in classes:
        precision = tp[c] / n_pred[c] if n_pred[c] else 0.0
        recall = tp[c] / n_true[c] if n_true[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append(
            {"class": c, "precision": precision, "recall": recall, "f1": f1, "support": n_true[c]}
        )
    return out


def confusion_matrix(
    labels: Sequence[int], preds: Sequence[int]
) -> tuple[list[int], list[list[int]]]:
    """Confusion matrix restricted to the classes that occur as labels or predictions.

    Returns:
        ``(classes, matrix)``: the sorted classes and ``matrix[i][j]``, the number of images of
        class ``classes[i]`` predicted as ``classes[j]``.
    """
    classes = sorted(set(labels) | set(preds))
    pos = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for t, p in zip(labels, preds, strict=True):
        matrix[pos[t]][pos[p]] += 1
    return classes, matrix


def confused_pairs(labels: Sequence[int], preds: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(true, predicted, count)`` of the mistakes, most frequent first (ties by classes)."""
    counts = Counter((t, p) for t, p in zip(labels, preds, strict=True) if t != p)
    return sorted(((t, p, n) for (t, p), n in counts.items()), key=lambda r: (-r[2], r[0], r[1]))


def compute_metrics(
    predictions: Sequence[Prediction], class_names: Sequence[str], *, failures: int = 0
) -> dict[str, Any]:
    """Every aggregate of a run, as a JSON-ready dict.

    Only labelled predictions count towards accuracy, calibration and the per-class tables.

    Args:
        predictions: the stored predictions.
        class_names: name of each class index.
        failures: number of unreadable images (reported only).

    Returns:
        ``images``, ``labelled``, ``failures``, ``correct``, ``top1``, ``top5``, ``ece``,
        ``mean_loss``, ``calibration`` (per-bin dicts), ``per_class`` (dicts, with ``name``),
        ``confusion`` (``classes``, ``names``, ``matrix``) and ``confused_pairs`` (dicts with
        ``true``, ``pred``, their names and ``count``).
    """
    labelled = [p for p in predictions if p.label is not None]
    labels = [int(p.label) for p in labelled if p.label is not None]
    preds = [p.pred for p in labelled]
    n = len(labelled)
    correct = [p.label == p.pred for p in labelled]
    top5 = sum(p.label in p.top5 for p in labelled)
    confs = [p.confidence for p in labelled]
    classes, matrix = confusion_matrix(labels, preds)
    per_class = per_class_metrics(labels, preds, classes)
    for row in per_class:
        row["name"] = class_names[int(row["class"])]
    losses = [p.loss for p in labelled if p.loss is not None]
    return {
        "images": len(predictions),
        "labelled": n,
        "failures": failures,
        "correct": sum(correct),
        "top1": sum(correct) / n if n else 0.0,
        "top5": top5 / n if n else 0.0,
        "ece": expected_calibration_error(confs, correct),
        "mean_loss": sum(losses) / len(losses) if losses else 0.0,
        "calibration": calibration_bins(confs, correct),
        "per_class": per_class,
        "confusion": {
            "classes": classes,
            "names": [class_names[c] for c in classes],
            "matrix": matrix,
        },
        "confused_pairs": [
            {
                "true": t,
                "pred": p,
                "true_name": class_names[t],
                "pred_name": class_names[p],
                "count": c,
            }
            for t, p, c in confused_pairs(labels, preds)
        ],
    }


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def reliability_figure(metrics: dict[str, Any]) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE."""
    fig = _figure(5, 4.5)
    ax = fig.add_subplot()
    bins = metrics["calibration"]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 1.0
    lefts = [b["lo"] for b in bins if b["count"]]
    ax.bar(
        lefts,
        [b["accuracy"] for b in bins if b["count"]],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="white",
        label="accuracy",
    )
    ax.bar(
        lefts,
        [b["confidence"] - b["accuracy"] for b in bins if b["count"]],
        width=width,
        bottom=[b["accuracy"] for b in bins if b["count"]],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap",
    )
    ax.plot([0, 1], [0, 1], "--", color="0.4", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE = {metrics['ece']:.3f})")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def confidence_histogram_figure(predictions: Sequence[Prediction]) -> Figure:
    """Histograms of the top-1 confidence of right and of wrong predictions."""
    fig = _figure(5, 4)
    ax = fig.add_subplot()
    right = [p.confidence for p in predictions if p.correct is True]
    wrong = [p.confidence for p in predictions if p.correct is False]
    edges = [k / ECE_BINS for k in range(ECE_BINS + 1)]
    ax.hist(right, bins=edges, alpha=0.6, color="tab:green", label=f"right ({len(right)})")
    ax.hist(wrong, bins=edges, alpha=0.6, color="tab:red", label=f"wrong ({len(wrong)})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("images")
    ax.set_title("confidence of right and wrong predictions")
    ax.legend(fontsize=8)
    return fig


def confusion_figure(metrics: dict[str, Any], max_classes: int = 30) -> Figure:
    """Heat map of the confusion matrix (the ``max_classes`` largest-support classes at most)."""
    conf = metrics["confusion"]
    classes, matrix, names = conf["classes"], conf["matrix"], conf["names"]
    if len(classes) > max_classes:
        columns = list(zip(*matrix, strict=True))
        totals = [sum(row) + sum(col) for row, col in zip(matrix, columns, strict=True)]
        keep = sorted(sorted(range(len(classes)), key=lambda i: -totals[i])[:max_classes])
        matrix = [[matrix[i][j] for j in keep] for i in keep]
        names = [names[i] for i in keep]
    k = max(1, len(names))
    side = min(12.0, 2.5 + 0.35 * k)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix if matrix else [[0]], cmap="Blues")
    short = [plot_label(n.split(",", 1)[0][:18]) for n in names]
    ax.set_xticks(range(len(short)), short, rotation=90, fontsize=7)
    ax.set_yticks(range(len(short)), short, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    if k <= 15:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.7)
    return fig
