"""The analysis run: streaming inference into the store, metrics, explanations of the errors.

:func:`analyze` is resumable: images already in ``RUN_DIR/predictions.sqlite`` (predicted or
recorded as unreadable) are skipped, and explanation panels and faithfulness scores already under
``RUN_DIR/explanations/`` are not recomputed. The run holds the lock of ``RUN_DIR``
(:func:`~convlens.outputs.lock_folder`), so a second run into the same folder fails at once
instead of mixing with it, and every file is written atomically (:mod:`convlens.atomic`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from convlens.analysis.failure_modes import (
    FEATURES_FILE,
    FailureMode,
    FeatureCache,
    FeatureCapture,
    features_pass,
    find_failure_modes,
    gap_head,
    select_images,
    stored_head,
)
from convlens.analysis.failure_modes import summarize as summarize_failure_modes
from convlens.analysis.faithfulness import FILE_NAME as FAITHFULNESS_FILE
from convlens.analysis.faithfulness import ScoreCache, Scores, score_maps, summarize
from convlens.analysis.report import write_report
from convlens.analysis.stats import (
    compute_metrics,
    confidence_histogram_figure,
    confusion_figure,
    reliability_figure,
)
from convlens.analysis.store import Prediction, PredictionStore, image_id
from convlens.atomic import atomic_write_bytes, atomic_write_text, is_complete, save_image
from convlens.console import printable
from convlens.errors import ConvlensError, InputError, RunFolderError
from convlens.models.base import ConvlensModel
from convlens.models.preprocess import Preprocess
from convlens.outputs import lock_folder

if TYPE_CHECKING:
    from PIL import Image

    from convlens.methods.base import Method
    from convlens.result import Explanation

__all__ = ["AnalysisResult", "analyze", "select_examined"]

log = logging.getLogger(__name__)

STORE_NAME = "predictions.sqlite"
THUMB_SIDE = 96
_PAIR_EXAMPLES = 2
_PAIRS = 5
NOT_FINITE = "model output is not finite (NaN/Inf)"
"""The failure reason recorded for an image whose model output has a NaN or an infinity."""
PANEL_RENDERING = 3
"""Version of how explanation panels and maps are made (2: signed maps red/blue; 3: SmoothGrad
and VarGrad noise drawn per image); part of the panel cache's key, so a resumed run remakes
panels, maps and scores made the older way."""


@dataclass
class AnalysisResult:
    """What :func:`analyze` produced.

    Attributes:
        out_dir: the run folder.
        metrics: aggregate metrics (see :func:`~convlens.analysis.stats.compute_metrics`).
        predictions: every stored prediction.
        failures: ``(path, reason)`` of the images skipped in the prediction pass: unreadable
            ones, and those whose model output was not finite (reason :data:`NOT_FINITE`).
        class_names: name of each class index.
        explanations: image id -> explanation panel (PNG) of the examined images.
        faithfulness: image id -> method -> ``{"deletion_auc": ..., "insertion_auc": ...}``
            of each explained image's map for the predicted class, with a random map under
            ``"(random)"``; empty when ``analyze(faithfulness=False)``. The summary is
            ``metrics["faithfulness"]``.
        unexplained: ``(path, reason)`` of examined images that could not be read any more
            when their explanations were due (deleted or corrupted after the prediction pass);
            their predictions still count.
        failure_modes: the clusters of mistakes, best first (see
            :mod:`convlens.analysis.failure_modes`); their summary is
            ``metrics["failure_modes"]``. Empty when ``analyze(failure_modes=False)`` or the
            model has no GAP + linear head.
        report: the report's ``index.html``.
        thumbnails: ids of the images whose thumbnail (``thumbs/ID.jpg``) is complete, as
            checked by :func:`analyze`; ``None``: the report checks each file itself.
    """

    out_dir: Path
    metrics: dict[str, Any]
    predictions: list[Prediction]
    failures: list[tuple[str, str]]
    class_names: list[str]
    explanations: dict[str, Path] = field(default_factory=dict)
    unexplained: list[tuple[str, str]] = field(default_factory=list)
    faithfulness: Scores = field(default_factory=dict)
    failure_modes: list[FailureMode] = field(default_factory=list)
    report: Path | None = None
    thumbnails: frozenset[str] | None = None

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
            ImportError: pandas is not installed (pandas is optional; :meth:`table` gives the
                same rows as dicts).
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "AnalysisResult.dataframe() needs pandas, which is optional: "
                "pip install pandas (or use AnalysisResult.table(), the same rows as dicts)"
            ) from exc

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
        _write_thumbnail(image, self.thumbs / f"{image_id(path)}.jpg")
        return i, x, ""


THUMB_QUALITY = 85
"""JPEG quality of the report's thumbnails."""


def _thumbnail(image: Image.Image) -> Image.Image:
    """The report's thumbnail of ``image`` (at most :data:`THUMB_SIDE` pixels a side)."""
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    if small.mode not in ("RGB", "L"):
        small = small.convert("RGB")
    return small


def _write_thumbnail(image: Image.Image, thumb: Path) -> None:
    """Write the report's thumbnail of ``image`` unless a complete one is there already.

    A thumbnail is only decoration: when it cannot be written (full disk), a warning is logged
    and the report shows the file name instead.
    """
    if is_complete(thumb):
        return
    try:
        save_image(_thumbnail(image), thumb, quality=THUMB_QUALITY)
    except OSError as exc:
        log.warning("no thumbnail for the report: %s", exc)


def _stat(path: Path) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a regular file, else ``None``."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _repair_thumbnails(
    predictions: Sequence[Prediction], thumbs: Path, store: PredictionStore
) -> frozenset[str]:
    """Write the missing or incomplete thumbnails of stored predictions (left by a run that was
    killed or ran out of space, or by an older version that wrote files in place); the ids
    whose thumbnail is complete.

    Opening every thumbnail on every rerun would make a rerun's cost grow with the set: a
    thumbnail found complete is recorded in the store with its size and modification time
    (:meth:`~convlens.analysis.store.PredictionStore.record_complete`), and later runs trust it
    while both are unchanged (one ``stat``, no open). A thumbnail truncated or replaced since
    has another size or time, so it is checked (:func:`~convlens.atomic.is_complete`: its last
    bytes read) and redrawn when incomplete.
    """
    from convlens.images import load_image

    known = store.complete_files()
    found: dict[str, tuple[int, int]] = {}
    complete: set[str] = set()
    for p in predictions:
        thumb = thumbs / f"{p.id}.jpg"
        name = f"{thumbs.name}/{thumb.name}"
        now = _stat(thumb)
        if now is not None and known.get(name) == now:
            complete.add(p.id)
            continue
        if not is_complete(thumb):
            thumb.unlink(missing_ok=True)
            try:
                image = load_image(p.path)
            except (ConvlensError, OSError) as exc:
                log.info("no thumbnail for %s: %s", printable(p.path), printable(str(exc)))
                continue
            _write_thumbnail(image, thumb)
            if not is_complete(thumb):  # not writable now (a full disk): tried again next run
                continue
            now = _stat(thumb)
        if now is not None:
            found[name] = now
            complete.add(p.id)
    store.record_complete(found)
    return frozenset(complete)


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
    from convlens.console import progress_bar

    return progress_bar()


@dataclass
class _Launched:
    """One batch's results on their way to the host (``ready`` is set once they are there)."""

    idx: list[int]
    failed: list[tuple[int, str]]
    top_probs: torch.Tensor | None = None  # (B, k)
    top_classes: torch.Tensor | None = None  # (B, k)
    label_log_probs: torch.Tensor | None = None  # (B,), NaN without a label
    finite: torch.Tensor | None = None  # (B,) bool: every output of the image is finite
    ready: Any = None  # a CUDA event, or None when the tensors are already on the host
    features: torch.Tensor | None = None  # (B, C) penultimate features, on the host
    features_ready: Any = None  # a CUDA event for the features' copy, or None


class _FeatureRecorder:
    """Keeps the penultimate features of the prediction pass (failure modes) in a
    :class:`~convlens.analysis.failure_modes.FeatureCache` under ``folder``.

    The classifier is found in the first batch's own forward pass (the last ``nn.Linear`` that
    makes the output); after the pass, one image confirms that it reads a global average of a
    feature map (:func:`~convlens.analysis.failure_modes.gap_head`). A resumed run takes the head
    recorded with the features when the classifier's weights are unchanged (no pass at all). A
    model without such a head records nothing.
    """

    def __init__(self, model: ConvlensModel, folder: Path) -> None:
        self.model = model
        self.folder = folder
        self.checked = False
        self.head: Any = None
        self.cache: FeatureCache | None = None
        self.capture: FeatureCapture | None = None

    def start(self) -> None:
        """Before the first batch: find the classifier in its forward pass (no extra pass)."""
        if not self.checked:
            self.checked = True
            self.capture = FeatureCapture()

    def found(self) -> None:
        """After a batch: take the classifier the first batch found (its feature layer is
        confirmed, by :func:`~convlens.analysis.failure_modes.gap_head`, after the pass)."""
        capture = self.capture
        if self.cache is not None or capture is None:
            return
        if capture.fc_name is None:
            self.capture = None
            return
        from convlens.architecture import GapHead, LayerRef
        from convlens.hooks.capture import named_module

        fc = named_module(self.model.net, capture.fc_name)
        assert isinstance(fc, torch.nn.Linear)
        bias = None if fc.bias is None else fc.bias.detach()
        self.head = GapHead(LayerRef(""), capture.fc_name, fc.weight.detach(), bias)
        self.cache = FeatureCache(self.folder / FEATURES_FILE, self.head)

    def adopt(self, fc_name: str | None) -> None:
        """Take the classifier a prediction pass elsewhere found by name (another process:
        the Ray engine's actors); its feature layer is confirmed after the pass, as for
        :meth:`found`."""
        if self.cache is not None:
            return
        self.checked = True
        self.capture = FeatureCapture(fc_name)
        self.found()

    def confirm(self, x: torch.Tensor) -> None:
        """Check that the classifier found reads a global average of a feature map (one pass
        of one image) and record that map's layer; forget the features otherwise."""
        if self.head is not None and str(self.head.layer):
            return
        head = gap_head(self.model, x)
        if self.head is None or head is None or head.fc_name != self.head.fc_name:
            self._use(head)
            return
        self.head = head
        if self.cache is not None:
            self.cache.head = head
            self.cache.dirty = True

    def resume(self) -> bool:
        """Take the head recorded with the features of an earlier run, if the classifier's
        weights are unchanged (no forward pass); whether it did."""
        if self.checked:
            return True
        head = stored_head(self.folder / FEATURES_FILE, self.model.net)
        if head is not None:
            self._use(head)
        return head is not None

    def _use(self, head: Any) -> None:
        self.checked = True
        self.head = head
        self.cache = None
        self.capture = None
        if head is not None:
            self.cache = FeatureCache(self.folder / FEATURES_FILE, head)
            self.capture = FeatureCapture(head.fc_name)

    def once(self) -> contextlib.AbstractContextManager[Any]:
        """The capture of the classifier's input for one forward pass (nothing without a head)."""
        if self.capture is None:
            return contextlib.nullcontext(None)
        return self.capture.once(self.model.net)

    def save(self) -> None:
        if self.cache is not None:
            self.cache.save()


def _launch_batch(
    model: ConvlensModel, x: torch.Tensor, labels: list[int | None], copy_stream: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Queue the forward pass of one batch and the copies of its top-k and label log-probs.

    On CUDA nothing here waits for the GPU: the input (pinned by the loader) is copied on
    ``copy_stream``, so the copy overlaps the previous batch's forward pass; the small outputs
    are copied back without blocking and an event marks when they have arrived, so the next
    batch can be read and launched meanwhile.

    Returns:
        Top-k probabilities and classes, the label's log-probability, whether each image's
        outputs are all finite, and the CUDA event (or ``None``).
    """
    device = model.device
    index = torch.tensor([-1 if lbl is None else lbl for lbl in labels])
    ready = None
    if device.type == "cuda":
        compute = torch.cuda.current_stream(device)
        side = copy_stream if copy_stream is not None else compute
        with torch.cuda.stream(side):
            # pinned sources, so that the copies do not wait for the GPU
            x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
            index = index.pin_memory().to(device, non_blocking=True)
        if side is not compute:
            compute.wait_stream(side)
            x.record_stream(compute)
            index.record_stream(compute)
    logits = model.net(x).float()
    finite = torch.isfinite(logits).all(dim=1)
    log_probs = torch.log_softmax(logits, dim=1)
    top = log_probs.exp().topk(min(5, logits.shape[1]), dim=1)
    picked = log_probs.gather(1, index.clamp(min=0)[:, None])[:, 0]
    picked = torch.where(index >= 0, picked, torch.full_like(picked, float("nan")))
    cuda = device.type == "cuda"
    out = [t.to("cpu", non_blocking=cuda) for t in (top.values, top.indices, picked, finite)]
    if cuda:
        ready = torch.cuda.Event()
        ready.record()
    return out[0], out[1], out[2], out[3], ready


def _finish_batch(
    launched: _Launched, todo: Sequence[tuple[str, int | None]]
) -> tuple[list[Prediction], list[tuple[int, str]]]:
    """Wait for a launched batch's results and turn them into predictions, and failures
    ``(index into todo, reason)`` for the images whose model output is not finite."""
    if launched.ready is not None:
        launched.ready.synchronize()
    if launched.features_ready is not None:
        launched.features_ready.synchronize()
    if launched.top_probs is None or launched.top_classes is None:
        return [], []
    classes = launched.top_classes.tolist()
    probs = launched.top_probs.tolist()
    label_lp = launched.label_log_probs.tolist() if launched.label_log_probs is not None else []
    finite = launched.finite.tolist() if launched.finite is not None else []
    out = []
    bad = []
    for b, i in enumerate(launched.idx):
        path, label = todo[i]
        if (finite and not finite[b]) or not all(math.isfinite(p) for p in probs[b]):
            bad.append((i, NOT_FINITE))
            continue
        top5 = tuple(int(c) for c in classes[b])
        out.append(
            Prediction(
                id=image_id(path),
                path=path,
                label=label,
                top5=top5,
                probs5=tuple(float(p) for p in probs[b]),
                loss=None if label is None else -float(label_lp[b]),
                correct=None if label is None else top5[0] == label,
            )
        )
    return out, bad


def _predict_loop(
    model: ConvlensModel,
    store: PredictionStore,
    todo: Sequence[tuple[str, int | None]],
    batches: Iterable[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]],
    advance: Any = None,
    recorder: _FeatureRecorder | None = None,
) -> None:
    """Predict ``batches`` of ``(indices into todo, inputs, failures)`` into the store.

    One batch is kept in flight: batch ``k + 1`` is read and launched before batch ``k``'s
    results are waited for and written (one transaction per batch). If reading or launching a
    batch fails, the batch before it is still written, so a crash loses only the failing batch.
    With a ``recorder``, the classifier's input of the same forward pass is kept for each image.
    """
    from convlens.hooks.state import model_state

    def finish(launched: _Launched) -> None:
        preds, not_finite = _finish_batch(launched, todo)
        failed = launched.failed + not_finite
        store.add_batch(preds, [(todo[i][0], reason) for i, reason in failed])
        if recorder is not None and recorder.cache is not None and launched.features is not None:
            recorder.cache.add([image_id(todo[i][0]) for i in launched.idx], launched.features)
        for i, reason in failed:
            log.warning("skipped %s: %s", printable(todo[i][0]), printable(reason))
        if advance is not None:
            advance(len(launched.idx) + len(launched.failed))

    pending: _Launched | None = None
    device = model.device
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    # no_grad rather than inference_mode: state a model creates lazily in its first forward
    # (cached grids, lazy modules) would otherwise become inference tensors, and the gradient
    # explanations that follow could not save them for backward.
    with (
        model_state(model.net, eval_mode=True, grads=False),
        torch.no_grad(),
        model.accel.threads_for_call(model.device) as threads,
    ):
        try:
            for idx, x, failed in batches:
                if threads is not None:
                    threads.check()  # decode workers and other processes take cores too
                launched = _Launched(idx=idx, failed=failed)
                if x is not None:
                    if recorder is not None:
                        recorder.start()
                    with (
                        recorder.once()
                        if recorder is not None
                        else contextlib.nullcontext(None) as cap
                    ):
                        top_probs, top_classes, label_lp, finite, ready = _launch_batch(
                            model, x, [todo[i][1] for i in idx], copy_stream
                        )
                    if recorder is not None:
                        recorder.found()
                    if cap is not None and cap.value is not None:
                        cuda = device.type == "cuda"
                        launched.features = cap.value.to("cpu", non_blocking=cuda)
                        if cuda:
                            launched.features_ready = torch.cuda.Event()
                            launched.features_ready.record()
                    launched.top_probs, launched.top_classes = top_probs, top_classes
                    launched.label_log_probs, launched.ready = label_lp, ready
                    launched.finite = finite
                if pending is not None:
                    done, pending = pending, None
                    finish(done)
                pending = launched
        finally:  # also when reading or launching the next batch failed
            if pending is not None:
                done, pending = pending, None
                finish(done)


def _infer(
    model: ConvlensModel,
    store: PredictionStore,
    items: Sequence[tuple[str, int | None]],
    *,
    thumbs: Path,
    batch_size: int,
    workers: int,
    progress: bool,
    recorder: _FeatureRecorder | None = None,
) -> None:
    """Predict the items not yet in the store, one transaction per batch."""
    done = store.finished_paths(retry=[NOT_FINITE])  # new weights may fix those
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
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    with _progress(progress) as bar:
        task = bar.add_task("predicting", total=len(todo)) if bar is not None else None
        advance = (lambda n: bar.advance(task, n)) if bar is not None else None
        _predict_loop(model, store, todo, loader, advance, recorder)


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


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON values: tensors by shape, dtype and a hash of their contents (``repr``
    abbreviates large tensors, so two different baselines could look equal), anything else
    (e.g. a method object) by ``repr``."""

    def value(v: Any) -> Any:
        if isinstance(v, (bool, int, float, str, type(None))):
            return v
        if isinstance(v, torch.Tensor):
            data = v.detach().cpu().contiguous()
            digest = hashlib.sha256(
                data.reshape(-1).view(torch.uint8).numpy().tobytes()
            ).hexdigest()
            return f"tensor{tuple(data.shape)} {data.dtype} sha256:{digest[:16]}"
        return repr(v)

    return {k: value(v) for k, v in options.items()}


def _load_readable(
    model: ConvlensModel, chunk: Sequence[Prediction]
) -> tuple[list[Prediction], torch.Tensor | None, list[tuple[str, str]]]:
    """Load each image of ``chunk``; those unreadable now are returned as ``(path, reason)``."""
    from convlens.images import load_image

    ok, xs, failed = [], [], []
    for p in chunk:
        try:
            xs.append(model.preprocess(load_image(p.path)))
        except (ConvlensError, OSError) as exc:
            failed.append((p.path, str(exc)))
            continue
        ok.append(p)
    return ok, (torch.stack(xs) if xs else None), failed


def _one_target(exp: Explanation, k: int) -> Explanation:
    """The explanation of target ``k`` only (K = 1), for the one-target panels."""

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, k : k + 1]

    return replace(
        exp,
        maps=exp.maps[:, k : k + 1],
        targets=exp.targets[:, k : k + 1],
        scores=exp.scores[:, k : k + 1],
        probs=exp.probs[:, k : k + 1],
        raw_maps=cut(exp.raw_maps),
        class_names=None if exp.class_names is None else [r[k : k + 1] for r in exp.class_names],
        attributions=cut(exp.attributions),
    )


@dataclass
class _Explained:
    """What :func:`_explain_errors` produced."""

    panels: dict[str, Path]
    unreadable: list[tuple[str, str]]
    faithfulness: Scores


MAPS_DIR = "maps"
"""Folder of the examined images' maps (``ID.npy``) in the run's ``explanations`` folder."""


def _panels_stamp(out: Path, config: str) -> None:
    """Keep the cached panels, maps and scores of ``out`` only if they were made under
    ``config``: otherwise they (and the Ray engine's list of them, ``*.parquet``) are removed,
    so that no panel or map of a method no longer asked for outlives the change."""
    stamp = out / "config.json"
    try:
        same = stamp.read_text(encoding="utf-8") == config
    except (OSError, ValueError):  # missing or unreadable: start over
        same = False
    if not same:
        for old in [*out.glob("*.png"), *out.glob("*.parquet"), *(out / MAPS_DIR).glob("*.npy")]:
            old.unlink()
        (out / FAITHFULNESS_FILE).unlink(missing_ok=True)
        atomic_write_text(stamp, config)


def _explain_chunk(
    model: ConvlensModel,
    part: Sequence[Prediction],
    methods: Mapping[str, Method],
    files: Mapping[str, Path],
    need_panel: set[str] | frozenset[str],
    need_score: set[str] | frozenset[str],
    *,
    batch_size: int,
    maps: Path | None = None,
) -> tuple[list[tuple[str, str]], Scores]:
    """Explain one chunk of examined images (one :func:`~convlens.api.explain` call for both
    targets): draw the panels of ``need_panel`` into ``files``, and score the predicted class's
    maps of ``need_score``. With ``maps``, each image's maps are also saved there as
    ``ID.npy`` (methods in order, then predicted and true class: ``(M, 2, H, W)``).

    The engines share it (the Ray engine runs it in its actors), so both draw and score the
    same chunks the same way.

    Returns:
        ``(path, reason)`` of the images unreadable now whose panel was due (those whose
        scores only were due are logged), and the scores by image id.
    """
    from convlens.api import explain
    from convlens.render import save_figure, side_by_side_figure

    chunk, x, failed = _load_readable(model, part)
    due = {p.path for p in part if p.id in need_panel}
    unreadable: list[tuple[str, str]] = []
    for path, reason in failed:
        if path in due:
            log.warning("cannot explain %s, unreadable now: %s", printable(path), printable(reason))
            unreadable.append((path, reason))
        else:
            log.warning(
                "cannot score the maps of %s, unreadable now: %s",
                printable(path),
                printable(reason),
            )
    if x is None:
        return unreadable, {}
    x = x.to(model.device)
    # both targets in one call: one sweep of a perturbation method serves both
    both = torch.tensor([[p.pred, int(p.label or 0)] for p in chunk], device=model.device)
    results = explain(model, x, list(methods.values()), target=both)
    for i, p in enumerate(chunk):
        if maps is not None:
            stacked = torch.stack([exp.maps[i] for exp in results.values()])
            atomic_write_bytes(maps / f"{p.id}.npy", _npy(stacked.detach().cpu().numpy()))
        if p.id not in need_panel:
            continue
        panels = {}
        for m, exp in results.items():
            panels[f"{m}: predicted"] = _one_target(exp, 0)
            panels[f"{m}: true"] = _one_target(exp, 1)
        fig = side_by_side_figure(panels, i)
        save_figure(fig, files[p.id])
        fig.clear()
    rows = [i for i, p in enumerate(chunk) if p.id in need_score]
    if not rows:
        return unreadable, {}
    sel = torch.tensor(rows, device=model.device)
    scores = score_maps(
        model,
        x[sel],
        {m: exp.maps[sel, 0] for m, exp in results.items()},
        both[sel, 0],
        [chunk[i].id for i in rows],
        batch_size=batch_size,
    )
    return unreadable, scores


def _npy(array: Any) -> bytes:
    """``array`` in NumPy's ``.npy`` format."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _explain_errors(
    model: ConvlensModel,
    examined: Sequence[Prediction],
    methods: Mapping[str, Method],
    out: Path,
    *,
    config: str,
    batch_size: int,
    progress: bool,
    faithfulness: bool = True,
    engine: Any = None,
) -> _Explained:
    """Side-by-side panels (predicted vs true class) of each examined image, cached as PNGs,
    its maps (``maps/ID.npy``, see :func:`_explain_chunk`), and the faithfulness scores of the
    predicted class's maps, cached in ``faithfulness.json``.

    The caches are kept while ``config`` (the methods and their options) is unchanged; other
    panels, maps and scores are removed first. An image is explained again when its panel or
    its maps are missing, or (with ``faithfulness``) its scores are; the scores are saved after
    each chunk. An image
    that can no longer be read (deleted or corrupted since the prediction pass) is skipped and
    returned as ``(path, reason)`` if its panel was due (if only its scores were, it is logged).

    The chunks (``batch_size`` images each, in order) are explained here one after the other,
    or by ``engine`` (:mod:`convlens.analysis.engine_ray`), which runs the same
    :func:`_explain_chunk` on each chunk elsewhere and yields the results as they come.
    """
    out.mkdir(parents=True, exist_ok=True)
    _panels_stamp(out, config)
    files = {p.id: out / f"{p.id}.png" for p in examined}
    cache = ScoreCache(out / FAITHFULNESS_FILE) if faithfulness else None
    names = [m.name for m in methods.values()]  # the keys of explain()'s results
    maps = out / MAPS_DIR
    need_panel = {
        p.id
        for p in examined
        if not (is_complete(files[p.id]) and is_complete(maps / f"{p.id}.npy"))
    }
    need_score = {p.id for p in examined if cache is not None and not cache.has(p.id, names)}
    todo = [p for p in examined if p.id in need_panel or p.id in need_score]
    unreadable: list[tuple[str, str]] = []
    with _progress(progress and bool(todo)) as bar:
        task = bar.add_task("explaining errors", total=len(todo)) if bar else None
        scoring = (
            bar.add_task("scoring maps", total=len(need_score)) if bar and need_score else None
        )
        parts = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        done: Iterable[tuple[Sequence[Prediction], list[tuple[str, str]], Scores]] = (
            engine.explain_chunks(parts, files, need_panel, need_score, batch_size=batch_size)
            if engine is not None
            else (
                (
                    part,
                    *_explain_chunk(
                        model,
                        part,
                        methods,
                        files,
                        need_panel,
                        need_score,
                        batch_size=batch_size,
                        maps=maps,
                    ),
                )
                for part in parts
            )
        )
        for part, failed, scores in done:
            unreadable += failed
            if cache is not None and scores:
                cache.update(scores)
                cache.save()
                if bar is not None and scoring is not None:
                    bar.advance(scoring, len(scores))
            if bar is not None:
                bar.advance(task, len(part))
    panels = {k: f for k, f in files.items() if is_complete(f)}
    scores = {} if cache is None else {k: cache.scores[k] for k in panels if cache.has(k, names)}
    return _Explained(panels, unreadable, scores)


MethodsArg = str | Sequence[str] | Mapping[str, Mapping[str, Any]]
"""Methods of :func:`analyze`: comma-separated names, a list of names, or ``{name: options}``."""


def _method_specs(
    methods: MethodsArg, method_options: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """``{name: options}`` with Grad-CAM first, from any accepted form of the arguments."""
    if isinstance(methods, str):
        text, methods = methods, [m.strip() for m in methods.split(",") if m.strip()]
        if not methods:
            raise InputError(
                f"methods {text!r} names no method; give e.g. 'gradcam' or 'gradcam,occlusion' "
                "(`convlens methods` lists them)"
            )
    if isinstance(methods, Mapping):
        specs = {str(k): dict(v or {}) for k, v in methods.items()}
    else:
        specs = {str(m): {} for m in methods}
    for name, options in (method_options or {}).items():
        if name not in specs:
            raise InputError(
                f"options are given for {name!r}, which is not among the methods "
                f"({', '.join(dict.fromkeys(['gradcam', *specs]))}); add it to the methods"
            )
        specs[name].update(options)
    return {"gradcam": specs.pop("gradcam", {}), **specs}


def analyze(
    model: ConvlensModel,
    data: str | Path,
    out_dir: str | Path,
    *,
    methods: MethodsArg = ("gradcam",),
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    top_errors: int = 50,
    batch_size: int = 32,
    workers: int = 0,
    limit: int | None = None,
    progress: bool = True,
    faithfulness: bool = True,
    failure_modes: bool = True,
    engine: str = "local",
    address: str | None = None,
    model_spec: Callable[[], ConvlensModel] | None = None,
    decode_cpus: float | None = None,
) -> AnalysisResult:
    """Error analysis of a classifier over a labelled image set, with a browsable report.

    Predictions stream into ``out_dir/predictions.sqlite`` (one transaction per batch; a rerun
    skips finished and previously failed images); metrics and plots are computed from the store;
    the most confident mistakes are explained for the predicted and the true class (panels in
    ``out_dir/explanations/``, the maps as ``explanations/maps/ID.npy``, ``(methods, 2, H, W)``),
    and each method's map for the predicted class is scored for faithfulness; the report is
    written to ``out_dir/report/index.html``. A change of methods or options removes the
    panels, maps and scores made for the old ones.

    Faithfulness (``faithfulness=True``): deletion and insertion (Petsiuk, Das & Saenko 2018,
    "RISE", §4; :func:`~convlens.metrics.deletion_insertion_many`, 20 steps of 5% of the pixels).
    Deletion sets the pixels to 0 in model-input space (the normalisation's mean colour; mid-grey
    for EfficientNet-Lite) in order of decreasing importance and records the probability of the
    predicted class; insertion puts them back, in the same order, onto a blurred copy of the image.
    The area under the curve is low for deletion and high for insertion when the map points at what
    the model uses. A random map of each image (uniform noise seeded by the image id) is scored the
    same way, and the report gives, per method, the mean areas and the share of images where the
    method beats the random map. Deletion favours fine-grained maps and insertion compact ones, so
    read them together (docs/metrics.md). The scores are cached per image in
    ``out_dir/explanations/faithfulness.json`` (saved after each chunk, reset with the panels when
    the methods or their options change). Cost: ``3 + 2 (steps - 1)`` = 41 forward passes per image
    for the first map and 38 for each further one, the random map included: 79 per examined image
    for Grad-CAM alone, several times the cost of its panels.

    Args:
        model: the classifier (see :func:`~convlens.load_model`).
        data: class folders (named by class name or synset) or a CSV with ``path,label``.
        out_dir: the run folder (created; reused to resume).
        methods: explanation methods: names (a list, or comma-separated), or a mapping from
            name to that method's options, e.g. ``{"occlusion": {"patch": 16, "stride": 8}}``
            (see :func:`~convlens.methods.options.method_options`). Grad-CAM is always
            included.
        method_options: options of methods named in ``methods``, e.g.
            ``{"occlusion": {"patch": 16}}`` (merged over those given in ``methods``).
        top_errors: number of most confident mistakes to explain.
        batch_size: images per forward pass and per explanation batch.
        workers: DataLoader worker processes for reading images.
        limit: use at most this many images (in sorted order).
        progress: show rich progress bars on stderr.
        faithfulness: score the maps of the examined images (deletion and insertion AUC for
            the predicted class, against a random map); ``False`` skips it (no scores, no
            report section).
        failure_modes: cluster the mistakes by the penultimate features of the prediction pass
            and rank the clusters, with the channels that push each towards the wrong class
            (:mod:`convlens.analysis.failure_modes`; GAP + linear heads); ``False`` skips it.
        engine: ``"local"`` (this process) or ``"ray"``: the prediction pass and the
            explanations on a Ray cluster (:mod:`convlens.analysis.engine_ray`; needs
            ``pip install convlens[ray]``), into the same store, metrics and report.
        address: the Ray cluster to join (``ray.init(address=...)``, e.g. ``"auto"`` or
            ``"HOST:6379"``; ``engine="ray"`` only). Default: the one this process is connected
            to, else a new local one.
        decode_cpus: for ``engine="ray"``: CPUs of each decoding task, the decode fan-out
            (default: 1 with GPUs, else 40% of the smallest node's CPUs, at most 1; see
            :class:`~convlens.analysis.engine_ray.RayEngine`).
        model_spec: for ``engine="ray"``: a picklable callable without arguments that builds
            ``model`` (e.g. ``functools.partial(load_model, "net.py:build", weights="w.pt")``);
            each worker rebuilds the model with it (the network itself is never pickled).

    Returns:
        The :class:`AnalysisResult`.

    Raises:
        InputError: no images found, bad arguments, an unknown method or option (the valid
            ones are listed); an unknown engine, ``address`` or ``model_spec`` without
            ``engine="ray"``, ``engine="ray"`` without ``model_spec`` or without Ray Data
            installed, or a Ray cluster that cannot be joined.
        RunFolderError: another process is writing ``out_dir`` (it holds the folder's lock),
            or ``out_dir`` holds a run of other data, another model or other classes.
        OutputError: a file cannot be written (full disk, permissions; the message names it);
            the store keeps every finished batch and a rerun resumes.
    """
    from convlens.data import read_labelled
    from convlens.validate import non_negative_int, positive_int

    batch_size = positive_int(batch_size, "batch_size")
    workers = non_negative_int(workers, "workers")
    top_errors = non_negative_int(top_errors, "top_errors")
    from convlens.methods.options import build_methods

    specs = _method_specs(methods, method_options)
    instances = build_methods(specs)  # checks names and options before any work
    runner = _engine(engine, address, model_spec, specs, decode_cpus)
    out = Path(out_dir)
    items = [(str(p), lbl) for p, lbl in read_labelled(data, model.classes, limit=limit)]
    if not items:
        raise InputError(f"no images found in {data}")
    with lock_folder(out, "analyze"), runner if runner is not None else contextlib.nullcontext():
        return _analyze_locked(
            model,
            data,
            out,
            items,
            specs,
            instances,
            top_errors=top_errors,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            faithfulness=faithfulness,
            failure_modes=failure_modes,
            engine=runner,
        )


ENGINES = ("local", "ray")
"""The engines of :func:`analyze`."""


def _engine(
    engine: object,
    address: str | None,
    model_spec: Callable[[], ConvlensModel] | None,
    specs: Mapping[str, Mapping[str, Any]],
    decode_cpus: float | None = None,
) -> Any:
    """The engine object of ``engine`` (``None``: this process), its arguments checked."""
    if engine not in ENGINES:
        raise InputError(f"engine {engine!r} is not one of: {', '.join(ENGINES)}")
    if engine == "local":
        if address is not None:
            raise InputError("--address is for --engine ray (the local engine joins no cluster)")
        if model_spec is not None:
            raise InputError("model_spec is for engine='ray' (the local engine uses the model)")
        if decode_cpus is not None:
            raise InputError("--decode-cpus is for --engine ray (the local engine: --workers)")
        return None
    from convlens.analysis.engine_ray import RayEngine

    return RayEngine(model_spec, specs, address=address, decode_cpus=decode_cpus)


def _run_meta(model: ConvlensModel, data: str | Path) -> dict[str, object]:
    """What identifies a run: the data set (absolute path), the model and its classes."""
    names = "\n".join(model.classes[i] for i in range(len(model.classes)))
    return {
        "data": str(Path(data).expanduser().resolve()),
        "model": model.name,
        "num_classes": len(model.classes),
        "classes": hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()[:16],
    }


def _check_same_run(
    out: Path, stored: Mapping[str, object], new: Mapping[str, object], data: str | Path
) -> None:
    """Raise unless ``stored`` (the store's meta) is empty or describes the run ``new`` too.

    Keys an older store lacks are not compared; its data path may be as given on the command
    line then.
    """
    differ = []
    if "data" in stored and stored["data"] not in (new["data"], str(data)):
        differ.append(f"data {stored['data']} (now {data})")
    if "model" in stored and stored["model"] != new["model"]:
        differ.append(f"model {stored['model']} (now {new['model']})")
    if "num_classes" in stored and stored["num_classes"] != new["num_classes"]:
        differ.append(f"{stored['num_classes']} classes (now {new['num_classes']})")
    elif "classes" in stored and stored["classes"] != new["classes"]:
        differ.append("other class names")
    if differ:
        raise RunFolderError(
            f"{out} holds another analysis run ({'; '.join(differ)}); give a new --out folder "
            "for this one (or delete that folder to start over)"
        )


def _analyze_locked(
    model: ConvlensModel,
    data: str | Path,
    out: Path,
    items: list[tuple[str, int | None]],
    specs: dict[str, dict[str, Any]],
    instances: Mapping[str, Method],
    *,
    top_errors: int,
    batch_size: int,
    workers: int,
    progress: bool,
    faithfulness: bool,
    failure_modes: bool = True,
    engine: Any = None,
) -> AnalysisResult:
    """:func:`analyze` in the run folder ``out``, whose lock is held; ``engine``: ``None``
    (this process) or the engine that predicts and explains (it is given the same store,
    feature recorder and explanation caches)."""
    names = list(instances)
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    class_names = [model.classes[i] for i in range(len(model.classes))]
    with PredictionStore(out / STORE_NAME) as store:
        meta = _run_meta(model, data)
        _check_same_run(out, store.meta(), meta, data)
        store.set_meta(**meta)
        recorder = _FeatureRecorder(model, out / FAILURE_MODES_DIR) if failure_modes else None
        try:
            (_infer if engine is None else engine.infer)(
                model,
                store,
                items,
                thumbs=thumbs,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
                recorder=recorder,
            )
        finally:
            if recorder is not None:
                recorder.save()
        wanted = {p for p, _ in items}
        predictions = [p for p in store.predictions() if p.path in wanted]
        failures = [f for f in store.failures() if f[0] in wanted]
        thumbnails = _repair_thumbnails(predictions, thumbs, store)
    metrics = compute_metrics(predictions, class_names, failures=len(failures))
    metrics["model"] = model.name
    metrics["methods"] = names
    metrics["method_options"] = {n: _jsonable(o) for n, o in specs.items() if o}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    from convlens.render import save_figure

    plots = out / "plots"
    for name, fig in (
        ("reliability", reliability_figure(metrics)),
        ("confidence", confidence_histogram_figure(predictions)),
        ("confusion", confusion_figure(metrics)),
    ):
        save_figure(fig, plots / f"{name}.png")
    examined = select_examined(predictions, metrics, top_errors)
    config = json.dumps(
        {"methods": {n: _jsonable(o) for n, o in specs.items()}, "render": PANEL_RENDERING},
        sort_keys=True,
    )
    explained = _explain_errors(
        model,
        examined,
        instances,
        out / "explanations",
        config=config,
        batch_size=batch_size,
        progress=progress,
        faithfulness=faithfulness,
        engine=engine,
    )
    if faithfulness:
        metrics["faithfulness"] = summarize(explained.faithfulness)
    modes: list[FailureMode] = []
    if recorder is not None:
        metrics["failure_modes"], modes = _failure_modes(
            model, predictions, recorder, batch_size, panels=explained.panels
        )
    if faithfulness or recorder is not None:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    result = AnalysisResult(
        out_dir=out,
        metrics=metrics,
        predictions=predictions,
        failures=failures,
        class_names=class_names,
        explanations=explained.panels,
        unexplained=explained.unreadable,
        faithfulness=explained.faithfulness,
        thumbnails=thumbnails,
        failure_modes=modes,
    )
    result.report = write_report(result, [p.id for p in examined])
    return result


FAILURE_MODES_DIR = "failure_modes"
"""Folder of the failure modes' files (the penultimate features) in the run folder."""


def _failure_modes(
    model: ConvlensModel,
    predictions: Sequence[Prediction],
    recorder: _FeatureRecorder,
    batch_size: int,
    panels: Mapping[str, Path] | None = None,
) -> tuple[dict[str, Any], list[FailureMode]]:
    """The failure modes of ``predictions`` and their ``metrics.json`` entry.

    Features come from the prediction pass (``recorder``) or the cache of an earlier run; the
    images still without them (predicted by a run that was killed before saving them, or by an
    older version) get them from one extra pass over those images only. ``panels``: the
    explanation panels of the examined mistakes, shown on the clusters' pages
    (:mod:`convlens.analysis.failure_pages` computes the rest of what those pages show).
    """
    import time

    from convlens.analysis.failure_modes import PUSH_EXACT

    started = time.perf_counter()
    chosen = select_images(predictions)
    if not chosen:
        return {"skipped": "no mistakes", "clusters": []}, []
    if not recorder.resume() or (recorder.head is not None and not str(recorder.head.layer)):
        # find (every image resumed) or confirm (found in the pass) the head on one image
        for p in chosen[:8]:
            _, x, _ = _load_readable(model, [p])
            if x is not None:
                recorder.confirm(x.to(model.device))
                break
    head = recorder.head
    if recorder.cache is None or head is None:
        return _gradient_failure_modes(
            model, predictions, chosen, batch_size, panels, recorder.folder.parent
        )
    if not str(head.layer):
        reason = "no image of a mistake could be read to check the model's head"
        return {"skipped": reason, "clusters": []}, []
    missing = [p for p in chosen if p.id not in recorder.cache.rows]
    if missing:
        log.info("computing the penultimate features of %d images", len(missing))
        rows, failed = features_pass(model, head, missing, batch_size)
        for path, reason in failed:
            log.warning(
                "no features for %s, unreadable now: %s", printable(path), printable(reason)
            )
        recorder.cache.add(list(rows), list(rows.values()) if rows else [])
    recorder.save()
    names = [model.classes[i] for i in range(len(model.classes))]
    modes = find_failure_modes(chosen, recorder.cache.rows, head.weight, head.bias, names)
    summary = summarize_failure_modes(
        modes,
        layer=str(head.layer),
        images=sum(1 for p in chosen if p.id in recorder.cache.rows),
        correct=sum(1 for p in chosen if p.correct and p.id in recorder.cache.rows),
        features_recomputed=len(missing),
    )
    summary["push_kind"] = PUSH_EXACT
    for cluster in summary["clusters"]:
        cluster["push_kind"] = PUSH_EXACT
    evidence = (head.layer, recorder.cache.rows, panels, recorder.folder.parent)
    _pages(model, modes, predictions, evidence, summary, started, batch_size)
    return summary, modes


def _gradient_failure_modes(
    model: ConvlensModel,
    predictions: Sequence[Prediction],
    chosen: Sequence[Prediction],
    batch_size: int,
    panels: Mapping[str, Path] | None,
    out: Path,
) -> tuple[dict[str, Any], list[FailureMode]]:
    """:func:`_failure_modes` for a head that is not GAP + linear: channels by gradient x
    activation at the last feature map (one pass with gradients over the clustered images,
    nothing cached; :func:`~convlens.analysis.failure_modes.gradient_failure_modes`)."""
    import time

    from convlens.analysis.failure_modes import PUSH_GRADIENT, gradient_failure_modes
    from convlens.errors import LayerError

    started = time.perf_counter()
    names = [model.classes[i] for i in range(len(model.classes))]
    try:
        modes, layer, feats, failed = gradient_failure_modes(model, chosen, names, batch_size)
    except LayerError as exc:
        return {
            "skipped": f"the model has no feature map to attribute to ({exc})",
            "clusters": [],
        }, []
    for path, reason in failed:
        log.warning("no features for %s, unreadable now: %s", printable(path), printable(reason))
    if layer is None:
        reason = "no image of a mistake could be read"
        return {"skipped": reason, "clusters": []}, []
    summary = summarize_failure_modes(
        modes,
        layer=str(layer),
        images=len(feats),
        correct=sum(1 for p in chosen if p.correct and p.id in feats),
        features_recomputed=len(feats),
    )
    summary["push_kind"] = PUSH_GRADIENT
    for cluster in summary["clusters"]:
        cluster["push_kind"] = PUSH_GRADIENT
    _pages(model, modes, predictions, (layer, feats, panels, out), summary, started, batch_size)
    return summary, modes


def _pages(
    model: ConvlensModel,
    modes: Sequence[FailureMode],
    predictions: Sequence[Prediction],
    evidence: tuple[Any, Mapping[str, Any], Mapping[str, Path] | None, Path],
    summary: dict[str, Any],
    started: float,
    batch_size: int,
) -> None:
    """Add what the clusters' pages show to ``summary``
    (:func:`~convlens.analysis.failure_pages.channel_evidence`; ``evidence``: the feature
    layer, the pooled features, the examined panels and the run folder), and record the
    stage's times in ``failure_modes/timing.json`` (not in ``metrics.json``, which stays the
    same when a run is resumed)."""
    import time

    from convlens.analysis.failure_pages import channel_evidence

    layer, feats, panels, out = evidence
    timing = {"clustering": time.perf_counter() - started}
    if modes:
        start = time.perf_counter()
        summary["evidence"] = channel_evidence(
            model, layer, modes, predictions, feats, panels or {}, out, batch_size=batch_size
        )
        timing["pages"] = time.perf_counter() - start
    log.info("failure modes: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
    text = json.dumps({k: round(v, 3) for k, v in timing.items()})
    atomic_write_text(out / FAILURE_MODES_DIR / "timing.json", text)
