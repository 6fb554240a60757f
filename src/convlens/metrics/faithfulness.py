"""Faithfulness of maps to the model: deletion/insertion curves, Average Drop / Increase in
Confidence."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from convlens.accel.compiled import FixedBatchForward, compiled_forward
from convlens.accel.folded import inference_copy
from convlens.accel.settings import Acceleration
from convlens.accel.threads import ThreadGovernor
from convlens.errors import InputError
from convlens.hooks.state import model_state
from convlens.methods.perturbation import blur
from convlens.models.base import ConvlensModel, unwrap
from convlens.validate import positive_float, positive_int

__all__ = [
    "DEFAULT_STEPS",
    "Curves",
    "average_drop",
    "deletion_insertion",
    "deletion_insertion_many",
    "metrics_accel",
    "ranking",
]

log = logging.getLogger(__name__)

DEFAULT_STEPS = 20
"""Default deletion/insertion steps: 5% of the pixels per step (docs/metrics.md measures the
effect on the areas against 50 and 100 steps)."""

Baseline = Literal["blur", "zero", "mean"] | torch.Tensor
Compile = bool | Literal["auto"]
"""The ``compile`` keyword of the metrics: ``True``, ``False`` or ``"auto"``, a shorthand for
``accel=accel.but(compile=...)`` (:func:`metrics_accel`)."""


def metrics_accel(
    model: nn.Module | ConvlensModel,
    accel: Acceleration | None = None,
    compile: Compile | None = None,
) -> Acceleration:
    """The accelerators a metrics call uses: ``accel``, else the model wrapper's
    :attr:`~convlens.models.ConvlensModel.accel`, else ``Acceleration()`` (as for a method
    call, :meth:`convlens.methods.base.Method.__call__`).

    ``compile`` (the metrics' older keyword, kept for its callers: ``convlens evaluate
    --compile``, the benchmarks) replaces the setting's ``compile``, except that it never turns
    compilation on where the setting has ``compile=False`` (``Acceleration.plain()``, ``--plain``),
    as occlusion's ``compile`` option does.

    Raises:
        InputError: ``accel`` is not an :class:`~convlens.accel.Acceleration`.
        ValueError: ``compile`` is not ``None``, ``True``, ``False`` or ``"auto"``.
    """
    if compile not in (None, True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', not {compile!r}")
    if accel is None:
        _, wrapper = unwrap(model)
        accel = wrapper.accel if wrapper is not None else Acceleration()
    if not isinstance(accel, Acceleration):
        raise InputError(f"accel must be a convlens.accel.Acceleration, not {type(accel).__name__}")
    if compile is not None and accel.compile is not False:
        accel = accel.but(compile=compile)
    return accel


@dataclass
class Curves:
    """Deletion and insertion curves of a batch (Petsiuk et al. 2018, §4).

    Attributes:
        fractions: (S + 1,) fraction of pixels removed (deletion) or inserted (insertion).
        deletion: (B, S + 1) target score after removing the most important pixels first.
        insertion: (B, S + 1) target score after inserting the most important pixels first.
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor

    @staticmethod
    def _auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        return torch.trapezoid(curve, fractions, dim=-1)

    @property
    def deletion_auc(self) -> torch.Tensor:
        """(B,) area under the deletion curve: lower is better."""
        return self._auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> torch.Tensor:
        """(B,) area under the insertion curve: higher is better."""
        return self._auc(self.insertion, self.fractions)


def _baseline(x: torch.Tensor, baseline: Baseline, sigma: float) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "blur":
        return blur(x, sigma)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"baseline must be 'blur', 'zero', 'mean' or a tensor, not {baseline!r}")


def ranking(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel by importance, (B, H, W): 0 for the most important.

    Ties keep raster order (a stable sort), so the result is deterministic.
    """
    b = maps.shape[0]
    flat = maps.reshape(b, -1).float()
    order = torch.sort(-flat, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand(b, -1))
    return rank.view(maps.shape)


class _Scorer:
    """Scores the target class on batches of inputs, with the model or its fast inference copy,
    as ``accel`` allows (:class:`~convlens.accel.Acceleration`).

    Use as a context manager: the user's model is put in eval mode (and restored) only when no
    copy is used. The copy (:func:`~convlens.accel.folded.inference_copy`) is made when
    ``accel.fold_batchnorm`` or ``channels_last`` (:meth:`~convlens.accel.Acceleration.
    uses_channels_last` on the input's device) is on; ``Acceleration.plain()`` scores the model
    itself. ``accel.compile``: ``True`` runs the copy compiled by ``torch.compile`` for
    ``batch_size`` images per pass (:class:`~convlens.accel.compiled.FixedBatchForward`:
    checked against eager execution on its first batch, eager whenever compilation fails);
    ``"auto"`` does so when the call's job, announced by :meth:`expect`, is long enough
    (:meth:`convlens.accel.Acceleration.compiles`); one compiled copy per network is kept
    between calls.
    """

    def __init__(
        self,
        model: nn.Module | ConvlensModel,
        example: torch.Tensor,
        *,
        accel: Acceleration,
        autocast: torch.dtype | None,
        batch_size: int,
    ) -> None:
        self.net, self.wrapper = unwrap(model)
        self.example = example
        self.copy: nn.Module | None = None
        self.accel = accel
        self.threads: ThreadGovernor | None = None
        self.fold = accel.fold_batchnorm
        self.layout = accel.uses_channels_last(example.device)
        if self.fold or self.layout:
            try:
                self.copy = inference_copy(
                    model, example, fold=self.fold, channels_last=self.layout
                )
            except Exception as exc:  # an uncopyable or scripted model: use it as it is
                log.info(
                    "no fast inference copy (%s: %s); using the model", type(exc).__name__, exc
                )
        self.autocast = autocast
        self.batch_size = positive_int(batch_size, "batch_size")
        self.compiled: FixedBatchForward | None = None
        self._stack = contextlib.ExitStack()
        if accel.compile is True:
            self._use_compiled()

    def _use_compiled(self) -> None:
        if self.copy is None or self.compiled is not None:
            return
        copy = self.copy
        example = self.example
        dtype = example.dtype if example.is_floating_point() else torch.float32
        self.compiled = compiled_forward(
            self.net,
            lambda: copy,
            batch_size=self.batch_size,
            device=example.device,
            dtype=dtype,
        )

    def expect(self, n_images: int) -> None:
        """Announce the job: ``n_images`` images to score; with ``compile="auto"``, compile when
        that many make it worth it (:meth:`convlens.accel.Acceleration.compiles`)."""
        if self.accel.compile != "auto" or self.copy is None or self.compiled is not None:
            return
        if self.accel.compiles(self.example.device, n_images):
            self._use_compiled()

    def __enter__(self) -> _Scorer:
        try:
            if self.copy is None:
                self._stack.enter_context(model_state(self.net, eval_mode=True, grads=False))
            self._stack.enter_context(torch.no_grad())
            device = self.example.device
            self.threads = self._stack.enter_context(self.accel.threads_for_call(device))
        except BaseException:
            self._stack.close()  # what was entered is undone (the model's state restored)
            raise
        return self

    def __exit__(self, *exc: object) -> bool:
        self.threads = None
        self._stack.close()
        return False

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.copy is None:
            return self.net(batch)
        if self.layout:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and self.compiled.compiled is not False:
            return self.compiled(batch)
        return self.copy(batch)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 logits of one batch."""
        if self.threads is not None:
            self.threads.check()  # the cores other processes leave free, at most once a second
        if self.autocast is None:
            return self._forward(batch).float()
        with torch.autocast(device_type=batch.device.type, dtype=self.autocast):
            return self._forward(batch).float()

    def score(
        self, batch: torch.Tensor, targets: torch.Tensor, kind: Literal["prob", "logit"] = "prob"
    ) -> torch.Tensor:
        """(N,) score of ``targets`` on ``batch``, ``batch_size`` images per forward pass."""
        out = []
        for start in range(0, batch.shape[0], self.batch_size):
            logits = self.logits(batch[start : start + self.batch_size])
            s = torch.softmax(logits, dim=1) if kind == "prob" else logits
            t = targets[start : start + self.batch_size].view(-1, 1)
            out.append(s.gather(1, t).squeeze(1))
        return torch.cat(out)


def _curves(
    scorer: _Scorer,
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    *,
    steps: int,
    deletion_baseline: Baseline,
    insertion_baseline: Baseline,
    blur_sigma: float,
    score: Literal["prob", "logit"],
) -> dict[str, Curves]:
    b, _, h, w = x.shape
    hw = h * w
    names = list(maps)
    for name in names:
        if maps[name].shape != (b, h, w):
            raise ValueError(
                f"maps must be (B, H, W) = {(b, h, w)}, {name!r} is {tuple(maps[name].shape)}"
            )
    steps = positive_int(steps, "steps")
    blur_sigma = positive_float(blur_sigma, "blur_sigma")
    m_count = len(names)
    rank = torch.stack([ranking(maps[n].to(x.device)) for n in names]).view(m_count, b, 1, h, w)
    counts = torch.round(torch.linspace(0, hw, steps + 1, device=x.device)).long()
    targets = targets.to(x.device).view(b)
    base_del = _baseline(x, deletion_baseline, blur_sigma)
    base_ins = _baseline(x, insertion_baseline, blur_sigma)
    # The end points are the same for every map: nothing removed / inserted is the image itself,
    # everything removed / nothing inserted is the baseline. One forward each, shared.
    ends = scorer.score(torch.cat([x, base_del, base_ins]), targets.repeat(3), score).cpu()
    s_x, s_del, s_ins = ends.view(3, b)
    deletion = torch.empty(m_count, b, steps + 1)
    insertion = torch.empty(m_count, b, steps + 1)
    deletion[:, :, 0], deletion[:, :, steps] = s_x, s_del
    insertion[:, :, 0], insertion[:, :, steps] = s_ins, s_x
    inner = steps - 1  # perturbed images per image, map and curve
    per_mode = m_count * b * inner
    scorer.expect(2 * per_mode)
    flat_del, flat_ins = deletion[:, :, 1:steps], insertion[:, :, 1:steps]
    out = torch.empty(2 * per_mode)
    for start in range(0, 2 * per_mode, scorer.batch_size):
        idx = torch.arange(start, min(start + scorer.batch_size, 2 * per_mode), device=x.device)
        is_del = (idx < per_mode).view(-1, 1, 1, 1)
        rem = idx % per_mode
        m, rem = rem // (b * inner), rem % (b * inner)
        img, k = rem // inner, rem % inner + 1
        chosen = rank[m, img] < counts[k].view(-1, 1, 1, 1)
        batch = torch.where(
            is_del,
            torch.where(chosen, base_del[img], x[img]),
            torch.where(chosen, x[img], base_ins[img]),
        )
        out[start : start + idx.numel()] = scorer.score(batch, targets[img], score).cpu()
    flat_del.copy_(out[:per_mode].view(m_count, b, inner))
    flat_ins.copy_(out[per_mode:].view(m_count, b, inner))
    fractions = counts.cpu().float() / hw
    return {n: Curves(fractions, deletion[j], insertion[j]) for j, n in enumerate(names)}


def deletion_insertion_many(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    deletion_baseline: Baseline = "zero",
    insertion_baseline: Baseline = "blur",
    blur_sigma: float = 10.0,
    score: Literal["prob", "logit"] = "prob",
    batch_size: int = 64,
    autocast: torch.dtype | None = None,
    accel: Acceleration | None = None,
    compile: Compile | None = None,
) -> dict[str, Curves]:
    """Deletion and insertion curves of several maps of the same images (see
    :func:`deletion_insertion`), sharing what they have in common.

    The first and last point of every curve do not depend on the map (the image itself, and the
    fully removed / not yet inserted baseline), so they cost 3 forward passes per image in all;
    each map adds ``2 (steps - 1)`` per image.

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        maps: ``{name: (B, H, W) map}``.
        targets: (B,) class indices.
        steps: number of steps ``S`` (default 20: 5% of the pixels per step).
        deletion_baseline: what removed pixels become (``"zero"``: 0 in model-input space).
        insertion_baseline: the starting image of insertion.
        blur_sigma: for blurred baselines, in pixels.
        score: ``"prob"`` (softmax) or ``"logit"``.
        batch_size: images per forward pass.
        autocast: e.g. ``torch.bfloat16``: run the forward passes under ``torch.autocast``
            (faster on CPUs with bf16 instructions and on GPUs, not exact; see docs/metrics.md).
        accel: the accelerators the call may use (default: the wrapper's
            :attr:`~convlens.models.ConvlensModel.accel`, else ``Acceleration()``); the scores
            equal the plain path's (``Acceleration.plain()``: the model itself) to float
            rounding. ``fold_batchnorm`` / ``channels_last``: score a copy of the model with
            BatchNorm folded into the convolutions and ``channels_last`` weights
            (:func:`convlens.accel.folded.inference_copy`); ``compile``: run that copy
            compiled by ``torch.compile`` (checked on the first batch; timings in
            ``benchmarks/RESULTS_METRICS.md``), ``"auto"``: on a CPU with a C++ compiler, when
            the call scores at least :data:`~convlens.accel.AUTO_COMPILE_PASSES` perturbed
            images. The compiled copy is kept for later calls with the same network and
            ``batch_size``.
        compile: shorthand for ``accel.but(compile=compile)`` (:func:`metrics_accel`).

    Returns:
        ``{name: Curves}``.
    """
    accel = metrics_accel(model, accel, compile)
    with _Scorer(model, x, accel=accel, autocast=autocast, batch_size=batch_size) as scorer:
        return _curves(
            scorer,
            x,
            maps,
            targets,
            steps=steps,
            deletion_baseline=deletion_baseline,
            insertion_baseline=insertion_baseline,
            blur_sigma=blur_sigma,
            score=score,
        )


def deletion_insertion(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    deletion_baseline: Baseline = "zero",
    insertion_baseline: Baseline = "blur",
    blur_sigma: float = 10.0,
    score: Literal["prob", "logit"] = "prob",
    batch_size: int = 64,
    autocast: torch.dtype | None = None,
    accel: Acceleration | None = None,
    compile: Compile | None = None,
) -> Curves:
    """Deletion and insertion curves (Petsiuk, Das & Saenko 2018, "RISE", §4).

    Deletion replaces the pixels with the baseline in order of decreasing importance, ``HW/S``
    pixels per step, and records the target's score ``p_k`` after ``k`` steps; a faithful map
    makes it fall fast (low area). Insertion starts from the (blurred) baseline and puts the
    pixels back in the same order; a faithful map makes it rise fast (high area). The area is
    the trapezoidal rule over the fraction of pixels, ``AUC = sum_k (p_k + p_{k+1}) / (2 S)``.
    All steps of all images are evaluated together, ``batch_size`` images per forward pass.

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        maps: (B, H, W) importance maps at input resolution (e.g. ``exp.maps[:, 0]``).
        targets: (B,) class indices.
        steps: number of steps ``S`` (default 20: 5% of the pixels per step; the paper removes
            224 pixels per step of a 224 x 224 image, S = 224).
        deletion_baseline: what removed pixels become (``"zero"``: 0 in model-input space).
        insertion_baseline: the starting image of insertion.
        blur_sigma: for blurred baselines, in pixels.
        score: ``"prob"`` (softmax) or ``"logit"``.
        batch_size: images per forward pass.
        autocast: run the forward passes under ``torch.autocast`` with this dtype (not exact).
        accel: the accelerators the call may use (equal to float rounding; see
            :func:`deletion_insertion_many`).
        compile: shorthand for ``accel.but(compile=compile)`` (:func:`metrics_accel`).

    Returns:
        The curves; ``.deletion_auc`` and ``.insertion_auc`` give the areas.

    Raises:
        ValueError: ``maps`` is not (B, H, W) or ``steps`` < 1.
    """
    return deletion_insertion_many(
        model,
        x,
        {"map": maps},
        targets,
        steps=steps,
        deletion_baseline=deletion_baseline,
        insertion_baseline=insertion_baseline,
        blur_sigma=blur_sigma,
        score=score,
        batch_size=batch_size,
        autocast=autocast,
        accel=accel,
        compile=compile,
    )["map"]


def _unit_masks(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    b = maps.shape[0]
    flat = maps.reshape(b, -1).float()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view(b, 1, *x.shape[-2:]).to(x)


def _masked(x: torch.Tensor, maps: torch.Tensor, wrapper: ConvlensModel | None) -> torch.Tensor:
    unit = _unit_masks(x, maps.to(x.device))
    if wrapper is not None:
        return wrapper.preprocess.normalize(wrapper.preprocess.denormalize(x) * unit)
    return x * unit


def _drop_increase(y: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    drop = (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return drop.cpu(), (o > y).float().cpu()


def average_drop(
    model: nn.Module | ConvlensModel,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    *,
    accel: Acceleration | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018, "Grad-CAM++", §5.1).

    Each image is multiplied by its map rescaled to [0, 1] (in [0, 1] pixel space when the
    model's preprocessing is known, else in model-input space) and re-scored:
    ``drop_i = max(0, Y_i - O_i) / Y_i`` and ``increase_i = [O_i > Y_i]``, with ``Y`` the
    target's probability on the image and ``O`` on the masked image.

    Args:
        model: the classifier.
        x: (B, 3, H, W) inputs.
        maps: (B, H, W) maps at input resolution.
        targets: (B,) class indices.
        accel: the accelerators the call may use (equal to float rounding; see
            :func:`deletion_insertion_many`).

    Returns:
        ``(drop (B,), increase (B,))``; their means (x100) are the paper's % figures.
    """
    _, wrapper = unwrap(model)
    b = x.shape[0]
    masked = _masked(x, maps, wrapper)
    t = targets.to(x.device).view(b)
    with _Scorer(
        model, x, accel=metrics_accel(model, accel), autocast=None, batch_size=b
    ) as scorer:
        y = scorer.score(x, t)
        o = scorer.score(masked, t)
    return _drop_increase(y, o)
