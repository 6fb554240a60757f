"""Failure modes: the mistakes grouped by what the model saw, and the channels that push them.

The first slice of "from mistakes to causes" (issue 18), for classifiers that end in global
average pooling and one linear layer (``logits = W f + b``, ``f = mean_hw(A)``; found by
:func:`convlens.architecture.find_gap_head`).

1. **Penultimate features** ``f`` (the classifier's input, ``(C,)`` per image) are captured in the
   prediction pass itself by a forward pre-hook on the classifier that lives for one batch
   (:class:`FeatureCapture`), and kept in ``RUN_DIR/failure_modes/features.npz`` (float32, written
   atomically, stamped with the classifier's weights), so a resumed run computes none again.
   Images predicted without them (a run killed before they were saved, a run of an older version)
   get them from one extra no-grad pass over those images only (:func:`features_pass`).
2. **Clustering** (:func:`find_failure_modes`): the mistakes plus the correct predictions of the
   same true classes, each feature standardised over that set (z-score) and each row
   L2-normalised, so clusters follow the *pattern* of channels rather than overall activation
   strength, then projected on its first 32 principal components (PCA, ``random_state=0``:
   KMeans on 1280 channels costs far more, and the strong directions a shared cue makes are
   kept). :class:`sklearn.cluster.KMeans` (``n_init=4``, ``random_state=0``: deterministic)
   with ``k = clamp(n // 25, 2, 8)`` for ``n`` images: deliberately *more* clusters than the
   data's coarse structure. The coarse structure is the classes (choosing ``k`` by silhouette
   picks one cluster per class on synthetic data with 96 channels), and a cue shared by
   mistakes of several classes then hides inside them; finer clusters separate "class X with
   the cue" from "class X", while clusters of mistakes without a common cause keep the base
   error rate (the no-cue control). KMeans rather than agglomerative clustering: linear in the
   number of images (agglomerative needs the ``O(n^2)`` distance matrix) and no distance
   threshold to tune to the feature scale.
3. **Ranking**: with ``n_c`` images and ``e_c`` mistakes in cluster ``c``, purity ``q_c = e_c/n_c``
   and ``p`` the error rate of the whole clustered set, the score is ``e_c * q_c`` (errors
   explained times concentration); clusters are ranked by it. ``lift = q_c / p``. A cluster
   **stands out** when ``z_c = (e_c - n_c p) / sqrt(n_c p (1 - p)) >= 3`` (a one-sided 3-sigma
   excess of errors over the base rate, binomial normal approximation) and ``e_c >= 3``; with no
   cue shared by the mistakes, no cluster should.
4. **Channels that push the wrong way** (:func:`wrong_way_contributions`), exact for a GAP +
   linear head: ``s_pred - s_true = sum_c (w_pred,c - w_true,c) f_c + (b_pred - b_true)``; per
   cluster, the channels with the largest mean contribution over its mistakes. **What
   distinguishes the cluster** (:func:`distinguishing_channels`): per channel, the difference of
   the mean activation of its mistakes and of the correctly classified images of the same true
   classes, as Cohen's d (pooled standard deviation).

Other heads (:func:`gradient_failure_modes`): the last feature map's spatial mean (for a
ViT or DeiT, the mean over the patch tokens of its default layer) is clustered, and the
channels come from gradient x activation (:func:`gradient_contributions`), a first-order
estimate that equals the exact decomposition on a GAP + linear head; which one
was used is ``push_kind`` (``"exact"`` or ``"gradient"``) in ``metrics.json``. The page of each
cluster (patches, channel maps) is :mod:`convlens.analysis.failure_pages`; channel indices are
those of :attr:`GapHead.layer`, the layer the feature browser works on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from convlens.atomic import atomic_write_bytes
from convlens.console import printable

if TYPE_CHECKING:
    from convlens.analysis.store import Prediction
    from convlens.architecture import GapHead, LayerRef
    from convlens.models.base import ConvlensModel

__all__ = [
    "FEATURES_FILE",
    "PUSH_EXACT",
    "PUSH_GRADIENT",
    "FailureMode",
    "FeatureCache",
    "FeatureCapture",
    "cluster_features",
    "distinguishing_channels",
    "features_pass",
    "find_failure_modes",
    "gap_head",
    "gradient_contributions",
    "gradient_failure_modes",
    "head_stamp",
    "select_images",
    "stored_head",
    "summarize",
    "wrong_way_contributions",
]

log = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
"""File of the penultimate features under ``RUN_DIR/failure_modes/``."""
MAX_CLUSTERS = 8
"""At most this many clusters; ``k = clamp(n // IMAGES_PER_CLUSTER, 2, MAX_CLUSTERS)``."""
IMAGES_PER_CLUSTER = 25
STAND_OUT_Z = 3.0
"""A cluster stands out when its excess of errors over the base rate is at least this many
binomial standard deviations (and it holds at least :data:`STAND_OUT_MIN_ERRORS` errors)."""
STAND_OUT_MIN_ERRORS = 3
MAX_IMAGES = 5000
"""At most this many images are clustered: every mistake first, then correct predictions of the
same true classes in a fixed order (by image id)."""
_COMPONENTS = 32
_N_INIT = 4
_TOP = 5  # channels and pairs listed per cluster
_REPRESENTATIVES = 3


def gap_head(model: ConvlensModel, x: torch.Tensor) -> GapHead | None:
    """The GAP + linear head of ``model`` (see :func:`~convlens.architecture.find_gap_head`),
    or ``None`` when it has none (logged)."""
    from convlens.architecture import find_gap_head
    from convlens.errors import UnsupportedModelError

    try:
        return find_gap_head(model.net, x)
    except UnsupportedModelError as exc:
        log.info("failure modes need a GAP + linear head: %s", exc)
        return None


def head_stamp(head: GapHead) -> str:
    """What identifies the classifier the features were captured for: a hash of its weight and
    bias (features of other weights are not reused)."""
    return _weights_stamp(head.weight, head.bias)


def _weights_stamp(weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    h = hashlib.sha256(str(tuple(weight.shape)).encode())
    for t in (weight, bias):
        if t is not None:
            data = t.detach().to("cpu", torch.float64).contiguous()
            h.update(data.reshape(-1).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCapture:
    """The input of the classifier ``fc_name`` (the pooled features, ``(B, C)``) for one forward
    pass at a time: ``with capture.once(net): net(x)`` then :attr:`value` (detached, float32, on
    the model's device). The hooks live only inside the block.

    Without ``fc_name`` the first pass finds the classifier in the same forward pass (no extra
    one): every ``nn.Linear`` records its input and output, and the classifier is the last one
    whose output is the network's output (as in :mod:`convlens.architecture`); ``fc_name`` is
    then set, or stays ``None`` when there is no such layer.
    """

    def __init__(self, fc_name: str | None = None) -> None:
        self.fc_name = fc_name
        self.value: torch.Tensor | None = None

    def _hook(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0].detach().flatten(1).float()

    @contextlib.contextmanager
    def once(self, net: nn.Module) -> Iterator[FeatureCapture]:
        from convlens.hooks.capture import hooks, named_module

        self.value = None
        if self.fc_name is not None:
            module = named_module(net, self.fc_name)
            with hooks([lambda: module.register_forward_pre_hook(self._hook)]):
                yield self
            return
        seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        output: list[Any] = []

        def linear(name: str) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    seen.append((name, args[0].detach().flatten(1).float(), out.detach()))

            return hook

        regs = [
            lambda n=n, m=m: m.register_forward_hook(linear(n))
            for n, m in net.named_modules()
            if isinstance(m, nn.Linear)
        ]
        regs.append(lambda: net.register_forward_hook(lambda _m, _a, out: output.append(out)))
        with hooks(regs):
            yield self
        out = output[-1] if output else None
        if not isinstance(out, torch.Tensor):
            return
        for name, inp, lin_out in reversed(seen):
            if lin_out.shape == out.shape and torch.allclose(
                lin_out.float(), out.detach().float(), atol=1e-5
            ):
                self.fc_name, self.value = name, inp
                return


class FeatureCache:
    """Penultimate features by image id, loaded from and saved to one ``.npz`` file.

    The file holds ``ids`` (str), ``features`` (float32, ``(N, C)``), ``stamp``
    (:func:`head_stamp`), and the head's ``fc_name`` and ``layer``; a file of another stamp, or
    unreadable, is ignored (a warning).
    """

    def __init__(self, path: Path, head: GapHead) -> None:
        self.path = path
        self.head = head
        self.stamp = head_stamp(head)
        self.rows: dict[str, np.ndarray] = {}
        self.dirty = False
        if not path.is_file():
            return
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["stamp"]) != self.stamp:
                    log.info(
                        "features in %s are of other weights; recomputing", printable(str(path))
                    )
                    return
                ids = [str(i) for i in z["ids"]]
                feats = np.asarray(z["features"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as exc:
            log.warning(
                "ignoring unreadable features file %s: %s",
                printable(str(path)),
                printable(str(exc)),
            )
            return
        self.rows = dict(zip(ids, feats, strict=True))

    def add(self, ids: Sequence[str], features: torch.Tensor | np.ndarray) -> None:
        feats = np.asarray(
            features.cpu().numpy() if isinstance(features, torch.Tensor) else features,
            dtype=np.float32,
        )
        for i, row in zip(ids, feats, strict=True):
            self.rows[i] = row
        self.dirty = self.dirty or bool(len(ids))

    def save(self) -> None:
        """Write the file atomically, if anything was added."""
        if not self.dirty:
            return
        ids = sorted(self.rows)
        buf = io.BytesIO()
        feats = np.stack([self.rows[i] for i in ids]) if ids else np.zeros((0, 0), np.float32)
        np.savez(
            buf,
            ids=np.array(ids, dtype=str),
            features=feats,
            stamp=np.array(self.stamp),
            fc_name=np.array(self.head.fc_name),
            layer=np.array(str(self.head.layer)),
        )
        atomic_write_bytes(self.path, buf.getvalue())
        self.dirty = False


def stored_head(path: Path, net: nn.Module) -> GapHead | None:
    """The head recorded in the features file ``path`` when ``net`` still has a linear layer
    of the same weights (no forward pass needed on a resumed run), else ``None``.

    The linear layer is found by its weights, so a network wrapped in another module (names
    with a prefix) still matches; the feature layer keeps the name recorded with the features
    (the run's results do not change when it is resumed).
    """
    from convlens.architecture import GapHead, parse_layer

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            fc_name, layer, stamp = str(z["fc_name"]), str(z["layer"]), str(z["stamp"])
    except (OSError, ValueError, KeyError):
        return None
    for name, fc in net.named_modules():
        if not isinstance(fc, nn.Linear) or not (name == fc_name or name.endswith("." + fc_name)):
            continue
        if _weights_stamp(fc.weight, fc.bias) != stamp:
            continue
        return GapHead(
            layer=parse_layer(layer),
            fc_name=name,
            weight=fc.weight.detach(),
            bias=None if fc.bias is None else fc.bias.detach(),
        )
    return None


def features_pass(
    model: ConvlensModel, head: GapHead, predictions: Sequence[Prediction], batch_size: int
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """The penultimate features of ``predictions``' images by one extra no-grad forward pass
    (for images predicted without them). Returns features by id and unreadable ``(path,
    reason)``."""
    from convlens.analysis.run import _load_readable
    from convlens.hooks.state import model_state

    out: dict[str, np.ndarray] = {}
    failed: list[tuple[str, str]] = []
    capture = FeatureCapture(head.fc_name)
    with model_state(model.net, eval_mode=True, grads=False), torch.no_grad():
        for start in range(0, len(predictions), batch_size):
            chunk, x, bad = _load_readable(model, predictions[start : start + batch_size])
            failed += bad
            if x is None:
                continue
            with capture.once(model.net):
                model.net(x.to(model.device))
            assert capture.value is not None
            for p, row in zip(chunk, capture.value.cpu().numpy(), strict=True):
                out[p.id] = row
    return out, failed


def wrong_way_contributions(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pred: torch.Tensor,
    true: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel decomposition of the margin of the predicted over the true class.

    For a GAP + linear head, ``s_k = sum_c W[k, c] f_c + b_k`` with ``f_c = mean_hw(A_c)``, so

        ``s_pred - s_true = sum_c (W[pred, c] - W[true, c]) f_c + (b_pred - b_true)``

    (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization", eq. 1-2, summed
    over positions instead of kept per position.)

    Args:
        features: pooled features ``(N, C)``.
        weight: the classifier's weight ``(K, C)``; ``bias``: its bias ``(K,)`` or ``None``.
        pred, true: predicted and true class of each row ``(N,)``.

    Returns:
        Channel contributions ``(N, C)`` and the bias term ``(N,)``, in the dtype of
        ``features``; their sum over channels plus the bias term is ``s_pred - s_true``.
    """
    w = weight.detach().to(features)
    contrib = (w[pred] - w[true]) * features
    if bias is None:
        term = torch.zeros(features.shape[0], dtype=features.dtype, device=features.device)
    else:
        b = bias.detach().to(features)
        term = b[pred] - b[true]
    return contrib, term


def distinguishing_channels(
    group: np.ndarray, reference: np.ndarray, top: int = _TOP
) -> list[dict[str, float | int]]:
    """The channels whose mean activation differs most between ``group`` ``(n, C)`` and
    ``reference`` ``(m, C)``, by Cohen's d: ``(mean_g - mean_r) / s_pooled`` with
    ``s_pooled^2 = ((n-1) s_g^2 + (m-1) s_r^2) / (n + m - 2)`` (0 where both are constant).

    Returns:
        Up to ``top`` channels by ``|d|``: ``{"channel", "group_mean", "reference_mean",
        "effect_size"}``; empty when either side has fewer than 2 rows.
    """
    n, m = len(group), len(reference)
    if n < 2 or m < 2:
        return []
    g = group.astype(np.float64)
    r = reference.astype(np.float64)
    mg, mr = g.mean(0), r.mean(0)
    pooled = ((n - 1) * g.var(0, ddof=1) + (m - 1) * r.var(0, ddof=1)) / (n + m - 2)
    sd = np.sqrt(pooled)
    d = np.divide(mg - mr, sd, out=np.zeros_like(mg), where=sd > 1e-12)
    order = np.lexsort((np.arange(len(d)), -np.abs(d)))[:top]
    return [
        {
            "channel": int(c),
            "group_mean": float(mg[c]),
            "reference_mean": float(mr[c]),
            "effect_size": float(d[c]),
        }
        for c in order
    ]


def _normalise(features: np.ndarray) -> np.ndarray:
    """Standardise each channel over the rows, then L2-normalise each row."""
    x = features.astype(np.float64)
    sd = x.std(0)
    x = (x - x.mean(0)) / np.where(sd > 1e-12, sd, 1.0)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 1e-12, norm, 1.0)


def cluster_features(features: np.ndarray, max_clusters: int = MAX_CLUSTERS) -> np.ndarray:
    """Cluster labels of the rows of ``features`` ``(N, C)``: standardised and L2-normalised,
    projected on the first 32 principal components, KMeans (``n_init=4``, ``random_state=0``)
    with ``k = clamp(N // 25, 2, max_clusters)`` (see the module docstring for why not by
    silhouette). Deterministic. Fewer than 4 rows, or rows that are all alike, form one
    cluster."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n = len(features)
    x = _normalise(features)
    if n < 4 or np.allclose(x, x[0]):
        return np.zeros(n, dtype=np.int64)
    if x.shape[1] > _COMPONENTS and n > _COMPONENTS:
        x = PCA(n_components=_COMPONENTS, random_state=0).fit_transform(x)
    k = min(max(n // IMAGES_PER_CLUSTER, 2), max_clusters, n - 1)
    labels = KMeans(n_clusters=k, n_init=_N_INIT, random_state=0).fit_predict(x)
    return np.asarray(labels, dtype=np.int64)


@dataclass
class FailureMode:
    """One cluster of images, with its numbers (see the module docstring for the formulas).

    Attributes:
        rank: 1 for the highest score.
        size, errors: images and mistakes in it; ``purity = errors / size``.
        lift: ``purity`` over the base error rate of the clustered set; ``z``: the excess of
            errors in binomial standard deviations; ``score = errors * purity``.
        stands_out: ``z >= 3`` and ``errors >= 3``.
        pairs: the most frequent ``(true, predicted)`` pairs of its mistakes.
        representatives: ids of the mistakes closest to the cluster's centroid.
        errors_ids, correct_ids: ids of its mistakes and of its correct predictions.
        push_channels: channels with the largest mean contribution to ``s_pred - s_true`` over
            its mistakes; ``push_method``: how they were computed.
        margin, bias_term: mean ``s_pred - s_true`` and mean bias term over its mistakes.
        distinguishing: channels that set its mistakes apart from the correct images of the
            same true classes (Cohen's d).
    """

    rank: int
    size: int
    errors: int
    purity: float
    lift: float
    z: float
    score: float
    stands_out: bool
    pairs: list[dict[str, Any]]
    representatives: list[str]
    errors_ids: list[str]
    correct_ids: list[str]
    push_channels: list[dict[str, float | int]] = field(default_factory=list)
    push_method: str = "exact decomposition (GAP + linear head)"
    margin: float = 0.0
    bias_term: float = 0.0
    distinguishing: list[dict[str, float | int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON of ``metrics.json`` (ids of members left out; representatives kept)."""
        d = asdict(self)
        d.pop("errors_ids")
        d.pop("correct_ids")
        return d


def select_images(predictions: Sequence[Prediction]) -> list[Prediction]:
    """The clustered images: every mistake, then correct predictions of the mistakes' true
    classes (by id), at most :data:`MAX_IMAGES` in all."""
    wrong = sorted((p for p in predictions if p.correct is False), key=lambda p: p.id)
    classes = {p.label for p in wrong}
    right = sorted(
        (p for p in predictions if p.correct is True and p.label in classes), key=lambda p: p.id
    )
    return (wrong + right)[:MAX_IMAGES] if len(wrong) < MAX_IMAGES else wrong[:MAX_IMAGES]


def find_failure_modes(
    predictions: Sequence[Prediction],
    features: Mapping[str, np.ndarray],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    class_names: Sequence[str],
) -> list[FailureMode]:
    """Cluster the mistakes with the correct predictions of the same classes and rank the
    clusters (see the module docstring).

    Args:
        predictions: labelled predictions; those without features are left out.
        features: pooled penultimate features by image id.
        weight, bias: the linear classifier.
        class_names: name of each class index.

    Returns:
        The clusters that hold at least one mistake, best first.
    """
    chosen = [p for p in select_images(predictions) if p.id in features]
    if not any(p.correct is False for p in chosen):
        return []
    feats = np.stack([features[p.id] for p in chosen]).astype(np.float64)
    labels = cluster_features(feats)
    x = _normalise(feats)
    is_err = np.array([p.correct is False for p in chosen])
    base = float(is_err.mean())
    f64 = torch.from_numpy(feats)
    w64 = weight.detach().to("cpu", torch.float64)
    b64 = None if bias is None else bias.detach().to("cpu", torch.float64)
    modes: list[FailureMode] = []
    for c in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == c)
        errs = members[is_err[members]]
        if len(errs) == 0:
            continue
        n_c, e_c = len(members), len(errs)
        purity = e_c / n_c
        sd = math.sqrt(n_c * base * (1 - base))
        z = (e_c - n_c * base) / sd if sd > 0 else 0.0
        pairs = Counter((chosen[i].label, chosen[i].pred) for i in errs)
        centroid = x[members].mean(0)
        dist = np.linalg.norm(x[errs] - centroid, axis=1)
        reps = [chosen[int(errs[j])].id for j in np.lexsort((errs, dist))[:_REPRESENTATIVES]]
        true_classes = {chosen[i].label for i in errs}
        reference = [i for i in np.flatnonzero(~is_err) if chosen[i].label in true_classes]
        idx = torch.from_numpy(errs)
        contrib, term = wrong_way_contributions(
            f64[idx],
            w64,
            b64,
            torch.tensor([chosen[i].pred for i in errs]),
            torch.tensor([int(chosen[i].label or 0) for i in errs]),
        )
        mean = contrib.mean(0)
        order = sorted(range(len(mean)), key=lambda ch: (-float(mean[ch]), ch))[:_TOP]
        modes.append(
            FailureMode(
                rank=0,
                size=n_c,
                errors=e_c,
                purity=purity,
                lift=purity / base if base > 0 else 0.0,
                z=z,
                score=e_c * purity,
                stands_out=z >= STAND_OUT_Z and e_c >= STAND_OUT_MIN_ERRORS,
                pairs=[
                    {
                        "true": t,
                        "pred": pr,
                        "true_name": class_names[t] if t is not None else "(no label)",
                        "pred_name": class_names[pr],
                        "count": k,
                    }
                    for (t, pr), k in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:_TOP]
                ],
                representatives=reps,
                errors_ids=[chosen[i].id for i in errs],
                correct_ids=[chosen[i].id for i in members if not is_err[i]],
                push_channels=[{"channel": ch, "contribution": float(mean[ch])} for ch in order],
                margin=float((contrib.sum(1) + term).mean()),
                bias_term=float(term.mean()),
                distinguishing=distinguishing_channels(feats[errs], feats[reference]),
            )
        )
    modes.sort(key=lambda m: (-m.score, -m.errors, m.errors_ids[0]))
    for r, m in enumerate(modes, 1):
        m.rank = r
    return modes


def summarize(
    modes: Sequence[FailureMode],
    *,
    layer: str,
    images: int,
    correct: int,
    features_recomputed: int,
) -> dict[str, Any]:
    """The ``failure_modes`` entry of ``metrics.json``."""
    return {
        "skipped": None,
        "method": f"kmeans (k = clamp(images // {IMAGES_PER_CLUSTER}, 2, {MAX_CLUSTERS})) on "
        f"standardised, L2-normalised pooled features (first {_COMPONENTS} principal components)",
        "score": "errors * purity",
        "stands_out": f"z >= {STAND_OUT_Z:g} and errors >= {STAND_OUT_MIN_ERRORS}",
        "layer": layer,
        "images_clustered": images,
        "correct_clustered": correct,
        "features_recomputed": features_recomputed,
        "any_stands_out": any(m.stands_out for m in modes),
        "clusters": [m.summary() for m in modes],
    }


PUSH_EXACT = "exact"
"""``push_kind`` of channels from the exact decomposition of a GAP + linear head."""
PUSH_GRADIENT = "gradient"
"""``push_kind`` of channels from the gradient x activation fallback
(:func:`gradient_contributions`)."""


def gradient_contributions(
    net: nn.Module,
    x: torch.Tensor,
    layer: str | LayerRef,
    pred: torch.Tensor,
    true: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient x activation attribution of ``s_pred - s_true`` to the channels of a feature map:
    the fallback of :func:`wrong_way_contributions` for heads other than GAP + linear.

    With ``A`` the ``(C, H, W)`` output of ``layer`` and ``D = s_pred - s_true`` (logits),

        ``r_c = sum_hw (dD / dA_chw) * A_chw = H W * mean_hw(dD/dA_c * A_c)``

    (gradient x input of Shrikumar et al. 2016, "Not Just a Black Box", taken at a feature map
    and summed over its positions, as the channel weights of Grad-CAM, Selvaraju et al. 2017,
    eq. 1, are averaged). For a GAP + linear head ``dD/dA_chw = (w_pred,c - w_true,c) / (H W)``,
    so ``r_c = (w_pred,c - w_true,c) mean_hw(A_c)``: the exact decomposition, term for term. For
    other heads it is a first-order estimate, and ``D - sum_c r_c`` is not the bias difference.

    A token layer of a vision transformer (``(N, T, C)`` tokens, or Swin's channels-last
    ``(N, H, W, C)``) is read as the ``(N, C, h, w)`` map of its patch tokens, as the CAM
    methods read it (:meth:`convlens.tokens.TokenLayout.to_maps`): activation and gradient are
    mapped alike, so ``r_c`` sums over the patch tokens; the class (and distillation) token's
    share of ``D`` stays in ``D - sum_c r_c``.

    The network runs in eval mode without parameter gradients (left as found); the hook on the
    layer lives for this call only.

    Args:
        net: the network; ``x``: its ``(N, 3, H, W)`` inputs.
        layer: ``"name"``, ``"name@call"`` or a :class:`~convlens.architecture.LayerRef`
            with a ``(N, C, h, w)`` output or a token output (above).
        pred, true: predicted and true class of each image ``(N,)``.

    Returns:
        Contributions ``r`` ``(N, C)``, pooled activations ``mean_hw(A)`` ``(N, C)`` and the
        margins ``D`` ``(N,)`` (detached, in the layer's dtype, on the model's device).
    """
    from convlens.architecture import parse_layer
    from convlens.errors import LayerError
    from convlens.hooks.capture import layer_capture, named_module
    from convlens.hooks.state import model_state
    from convlens.tokens import layer_layout

    ref = parse_layer(layer)
    with model_state(net, eval_mode=True, grads=False):
        with torch.no_grad(), layer_capture(net, ref.name, grad=True) as cap:
            logits = net(x)
            acts = cap.output(ref.call)
            if acts.dim() not in (3, 4):  # neither a feature map nor a token sequence
                shape = tuple(acts.shape)
                raise LayerError(f"layer {str(ref)!r} has no (N, C, H, W) or token output: {shape}")
            rows = torch.arange(len(x), device=logits.device)
            margin = logits[rows, pred.to(logits.device)] - logits[rows, true.to(logits.device)]
            (grad,) = torch.autograd.grad(margin.sum(), acts)
        # after the capture: finding the layout may run a pass of its own (the patch grid)
        layout = layer_layout(net, named_module(net, ref.name), acts, x, str(ref))
    a = layout.to_maps(acts.detach())
    contrib = (layout.to_maps(grad) * a).sum(dim=(2, 3))
    return contrib, a.mean(dim=(2, 3)), margin.detach()


def gradient_failure_modes(
    model: ConvlensModel,
    chosen: Sequence[Prediction],
    class_names: Sequence[str],
    batch_size: int,
) -> tuple[list[FailureMode], LayerRef | None, dict[str, np.ndarray], list[tuple[str, str]]]:
    """Failure modes of a model whose head is not GAP + linear: the fallback of
    :func:`find_failure_modes`.

    The layer is the last feature map (:func:`convlens.architecture.default_layer`, the layer
    Grad-CAM uses). One pass with gradients over the chosen images gives, per image, the
    feature map's spatial mean (clustered as the pooled features of a GAP head are) and the
    gradient x activation contribution of each channel to ``s_pred - s_true``
    (:func:`gradient_contributions`). Clusters, ranks and distinguishing channels are computed
    as for a GAP head; each cluster's ``push_channels`` are the largest mean contributions over
    its mistakes, ``push_method`` says so, ``margin`` is the mean ``s_pred - s_true`` and
    ``bias_term`` the mean remainder ``margin - sum_c r_c`` (not a bias: what the first-order
    attribution leaves unexplained).

    Returns:
        The clusters (best first), the layer (``None`` when no image could be read), the
        pooled features by id and the unreadable ``(path, reason)``.
    """
    from convlens.analysis.run import _load_readable
    from convlens.architecture import default_layer

    feats: dict[str, np.ndarray] = {}
    pushes: dict[str, np.ndarray] = {}
    margins: dict[str, float] = {}
    failed: list[tuple[str, str]] = []
    layer: LayerRef | None = None
    for start in range(0, len(chosen), batch_size):
        chunk, x, bad = _load_readable(model, chosen[start : start + batch_size])
        failed += bad
        if x is None:
            continue
        x = x.to(model.device)
        if layer is None:
            layer = default_layer(model.net, x[:1])
        pred = torch.tensor([p.pred for p in chunk])
        true = torch.tensor([int(p.label if p.label is not None else p.pred) for p in chunk])
        contrib, pooled, margin = gradient_contributions(model.net, x, layer, pred, true)
        for n, p in enumerate(chunk):
            feats[p.id] = pooled[n].float().cpu().numpy()
            pushes[p.id] = contrib[n].double().cpu().numpy()
            margins[p.id] = float(margin[n])
    if layer is None or not feats:
        return [], layer, feats, failed
    channels = len(next(iter(feats.values())))
    zero = torch.zeros(len(class_names), channels, dtype=torch.float64)
    modes = find_failure_modes(chosen, feats, zero, None, class_names)
    for m in modes:
        r = np.stack([pushes[i] for i in m.errors_ids])
        mean = r.mean(0)
        order = sorted(range(len(mean)), key=lambda ch: (-float(mean[ch]), ch))[:_TOP]
        m.push_channels = [{"channel": ch, "contribution": float(mean[ch])} for ch in order]
        m.push_method = "gradient x activation (head is not GAP + linear)"
        m.margin = float(np.mean([margins[i] for i in m.errors_ids]))
        m.bias_term = m.margin - float(r.sum(1).mean())
    return modes, layer, feats, failed
