"""The method interface: validation, targets, model state, upsampling and the result are owned
here; each method overrides one step, :meth:`Method.compute`."""

from __future__ import annotations

import contextlib
import contextvars
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from convlens.accel.settings import Acceleration
from convlens.accel.threads import ThreadGovernor
from convlens.architecture import LayerRef, default_layer, parse_layer
from convlens.errors import (
    BlankMapWarning,
    InferenceModeError,
    InputError,
    NonFiniteError,
    NonFiniteMapWarning,
    TargetError,
)
from convlens.hooks.state import full_float32, model_state
from convlens.methods.options import checked_init
from convlens.models.base import ConvlensModel, unwrap
from convlens.models.classes import ClassList
from convlens.result import Explanation
from convlens.targets import TargetSpec, resolve_targets
from convlens.validate import check_finite_inputs, listed, nonfinite_outputs, positive_int

__all__ = ["Cancelled", "Context", "Method", "RawResult", "notify_pace", "pace_listener"]

#: Called by :meth:`Context.pace` in the thread running a method (see :func:`pace_listener`).
_PACE_LISTENER: contextvars.ContextVar[Callable[[float | None], None] | None] = (
    contextvars.ContextVar("convlens_pace_listener", default=None)
)


class Cancelled(Exception):
    """Raised by a :func:`pace_listener` to stop a method between two chunks of its work (a
    live explorer's cancel button). The method's ``finally`` blocks restore the model as
    always; nothing is computed after."""


@contextlib.contextmanager
def pace_listener(listener: Callable[[float | None], None]) -> Iterator[None]:
    """Within the block, the long methods of this thread (occlusion, RISE, Score-CAM,
    Ablation-CAM, integrated gradients, SmoothGrad, VarGrad) call ``listener`` between chunks of
    their work with the fraction done in [0, 1] (``None`` when a step does not know it).
    The listener may raise :class:`Cancelled` to stop the method.

    Example:
        >>> with pace_listener(lambda f: print(f)):
        ...     convlens.explain(model, x, "occlusion")
    """
    token = _PACE_LISTENER.set(listener)
    try:
        yield
    finally:
        _PACE_LISTENER.reset(token)


def notify_pace(done: float | None = None, total: float | None = None) -> None:
    """Tell this thread's :func:`pace_listener`, if any, the fraction ``done / total`` of the
    work done (``None`` when unknown); it may raise :class:`Cancelled`. For long jobs that are
    not methods (a feature scan's progress callback)."""
    listener = _PACE_LISTENER.get()
    if listener is not None:
        listener(min(1.0, max(0.0, done / total)) if done is not None and total else None)


@dataclass
class Context:
    """What a method's :meth:`Method.compute` gets: the network (already in eval mode with
    frozen parameters), the batch, the user's target request and the accelerators the call may
    use (:class:`~convlens.accel.Acceleration`)."""

    net: nn.Module
    x: torch.Tensor
    target: TargetSpec
    top_k: int | None
    classes: ClassList | None
    layer: str | LayerRef | None
    accel: Acceleration = field(default_factory=Acceleration)
    threads: ThreadGovernor | None = None
    """The call's thread governor (``accel.threads == "auto"``), else ``None``."""

    def pace(self, done: float | None = None, total: float | None = None) -> None:
        """Between chunks of a long job: let the thread count follow the cores other processes
        leave free (:meth:`~convlens.accel.threads.ThreadGovernor.check`; at most one re-count
        a second), and tell this thread's :func:`pace_listener`, if any, the fraction
        ``done / total`` of the work done (it may raise :class:`Cancelled`). Changes nothing
        that is computed."""
        if self.threads is not None:
            self.threads.check()
        notify_pace(done, total)

    def targets(self, logits: torch.Tensor) -> torch.Tensor:
        """Resolve the target request against the clean logits, (B, K)."""
        return resolve_targets(self.target, logits, classes=self.classes, top_k=self.top_k)

    def layer_ref(self) -> LayerRef:
        """The requested layer, or the default layer of the CAM family."""
        if self.layer is None:
            return default_layer(self.net, self.x)
        return parse_layer(self.layer)


#: Fragments of PyTorch's messages when a network gets inputs of a size or channel count
#: it cannot take; re-raised as :class:`~convlens.errors.InputError` when the plain network
#: fails on the batch too (so errors of a method's own steps are never relabelled).
_SHAPE_ERRORS = (
    "Kernel size can't be greater than actual input size",
    "Calculated padded input size",
    "mat1 and mat2 shapes cannot be multiplied",
    "Given groups=",
    "Output size is too small",
    "size mismatch, got input",
    "is invalid for input of size",
    "The size of tensor a",
    "Sizes of tensors must match",
)


def _model_runs_on(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether one plain no-grad forward pass of the network on ``x[:1]`` succeeds."""
    try:
        with torch.no_grad():
            net(x[:1])
    except Exception:
        return False
    return True


def _nonfinite_logits_of(net: nn.Module, x: torch.Tensor) -> NonFiniteError | None:
    """:func:`nonfinite_outputs` of one plain no-grad forward pass (``None`` if it fails)."""
    try:
        with torch.no_grad():
            out = net(x)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    return nonfinite_outputs(out)


@dataclass
class RawResult:
    """What :meth:`Method.compute` returns."""

    maps: torch.Tensor  # (B, K, h, w)
    logits: torch.Tensor  # (B, num_classes) of the unchanged input
    targets: torch.Tensor  # (B, K)
    layer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    attributions: torch.Tensor | None = None  # (B, K, 3, H, W) pixel-space attributions


class Method:
    """Base of every explanation method.

    Subclasses set the class attributes and implement :meth:`compute`; calling the instance
    validates the input, puts the model in eval mode with frozen parameters for the call,
    restores it afterwards (also on error), upsamples the maps to the input size and builds the
    :class:`~convlens.result.Explanation`.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = True
    uses_layer: ClassVar[bool] = False
    finds_own_layer: ClassVar[bool] = False
    """The method uses a layer it finds itself and refuses one given (CAM: the map feeding
    global average pooling); :func:`convlens.explain` passes it no ``layer``."""
    needs_attention: ClassVar[bool] = False
    """The method reads the attention matrices of a vision transformer and refuses other
    models (CNNs) with an :class:`~convlens.errors.UnsupportedModelError`; tests run over the
    registry give it a transformer."""
    multiclass_rank: ClassVar[int] = 0
    """Preference for the multi-class view (one image's top-k class maps side by side, written
    by ``convlens explain --top-k``): of the methods run, the one with the highest rank above 0
    gets it (the first given on a tie); 0: never."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass constructor checks its arguments against the bounds declared on its
        parameters (``patch: PositiveInt``; see :func:`~convlens.methods.options.checked_init`)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def options(self) -> dict[str, Any]:
        """The method's settings (recorded in the result's ``meta``)."""
        return {}

    def __call__(
        self,
        model: nn.Module | ConvlensModel,
        x: torch.Tensor,
        target: TargetSpec = None,
        *,
        top_k: int | None = None,
        layer: str | LayerRef | None = None,
        accel: Acceleration | None = None,
    ) -> Explanation:
        """Explain the model's predictions on a batch.

        Args:
            model: a network or a :class:`~convlens.models.ConvlensModel`.
            x: (B, 3, H, W) float inputs, already preprocessed for the model.
            target: class(es) to explain; default the top-1 class (see
                :func:`~convlens.targets.resolve_targets`).
            top_k: explain the ``top_k`` most probable classes of each image.
            layer: for layer methods, a module name (``"_blocks.15"``), optionally with the call
                index for modules used several times (``"_swish@1"``); default chosen by the
                method.
            accel: the accelerators this call may use; default the wrapper's
                :attr:`~convlens.models.ConvlensModel.accel`, else ``Acceleration()``.
                ``Acceleration.plain()`` runs the plain PyTorch path (equal to float
                tolerance).

        Returns:
            An :class:`~convlens.result.Explanation` with maps (B, K, H, W).

        Maps that are all zero or not finite are flagged per image and target in the result's
        ``meta["blank"]`` and ``meta["nonfinite"]`` ((B, K) bool tensors) and reported with a
        :class:`~convlens.errors.BlankMapWarning` or
        :class:`~convlens.errors.NonFiniteMapWarning` naming them.

        Raises:
            InputError: ``x`` is not a float (B, 3, H, W) tensor, holds NaN or infinite values,
                or ``top_k`` is not a positive integer.
            NonFiniteError: the model's outputs are NaN or infinite for some of the (finite)
                inputs; the message names the images.
            TargetError, LayerError, UnsupportedModelError, InferenceModeError: see messages.
        """
        net, wrapper = unwrap(model)
        x = self._validate(x, net)
        if top_k is not None:
            top_k = positive_int(top_k, "top_k")
        classes = wrapper.classes if wrapper is not None else None
        if accel is None:
            accel = wrapper.accel if wrapper is not None else Acceleration()
        if not isinstance(accel, Acceleration):
            raise InputError(
                f"accel must be a convlens.accel.Acceleration, not {type(accel).__name__}"
            )
        ctx = Context(
            net=net, x=x, target=target, top_k=top_k, classes=classes, layer=layer, accel=accel
        )
        start = time.perf_counter()
        with (
            model_state(net, eval_mode=True, grads=self.uses_gradients),
            full_float32(),
            accel.threads_for_call(x.device) as ctx.threads,
        ):
            try:
                raw = self.compute(ctx)
            except Exception as exc:
                self._raise_if_nonfinite(net, x, exc)
                if (
                    not isinstance(exc, RuntimeError)
                    or not any(p in str(exc) for p in _SHAPE_ERRORS)
                    or _model_runs_on(net, x)
                ):
                    raise
                first = str(exc).strip().splitlines()[0]
                raise InputError(
                    f"the model fails on inputs of shape {tuple(x.shape)}: {first} (if the "
                    "image size or channel count is wrong, ConvlensModel.load_images "
                    "resizes images for the model)"
                ) from exc
            bad = nonfinite_outputs(raw.logits)
            if bad is not None:
                raise bad
        seconds = time.perf_counter() - start
        return self._result(raw, x, wrapper, seconds)

    @staticmethod
    def _raise_if_nonfinite(net: nn.Module, x: torch.Tensor, exc: BaseException) -> None:
        """After a failure: when the model's own outputs for ``x`` are not finite, that is the
        cause to report (a tolerance check or a search for the head fails on NaN), not the
        step that tripped over it."""
        if isinstance(
            exc, NonFiniteError | TargetError | InputError | InferenceModeError | Cancelled
        ):
            return  # the user's request or input is the cause, whatever the outputs are
        if isinstance(exc, torch.OutOfMemoryError):
            return  # another pass would run out of memory too
        bad = _nonfinite_logits_of(net, x)
        if bad is not None:
            raise bad from exc

    def compute(self, ctx: Context) -> RawResult:
        """Compute raw maps; the one step each method overrides."""
        raise NotImplementedError

    @staticmethod
    def _validate(x: torch.Tensor, net: nn.Module) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a (B, 3, H, W) tensor, got {type(x).__name__}")
        if x.dim() == 3:
            raise InputError("expected a batch (B, 3, H, W); use x.unsqueeze(0) for one image")
        if x.dim() != 4 or x.shape[0] == 0:
            raise InputError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"expected a float tensor, got {x.dtype}; preprocess the images")
        check_finite_inputs(x)
        if x.is_inference():
            x = x.clone()
        for p in net.parameters():
            if p.device != x.device:
                raise InputError(
                    f"input is on {x.device} but the model is on {p.device}; move one of them"
                )
            if p.is_floating_point() and p.dtype != x.dtype:
                x = x.to(p.dtype)
            break
        return x.detach()

    def _result(
        self,
        raw: RawResult,
        x: torch.Tensor,
        wrapper: ConvlensModel | None,
        seconds: float,
    ) -> Explanation:
        h, w = x.shape[-2:]
        maps = raw.maps.detach().float()
        upsampled = maps
        if maps.shape[-2:] != (h, w):
            upsampled = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        logits = raw.logits.detach().float()
        probs_all = torch.softmax(logits, dim=1)
        k5 = min(5, logits.shape[1])
        top = probs_all.topk(k5, dim=1)
        targets = raw.targets.detach()
        class_names = top_names = None
        images = None
        if wrapper is not None:
            cl = wrapper.classes
            if len(cl) == logits.shape[1]:
                # one copy to the host each (not one synchronisation per element on a GPU)
                class_names = [[cl[t] for t in row] for row in targets.tolist()]
                top_names = [[cl[t] for t in row] for row in top.indices.tolist()]
            images = wrapper.display(x).float()
        meta = {"seconds": seconds, **self.options(), **raw.meta, **self._flags(upsampled, targets)}
        return Explanation(
            method=self.name,
            maps=upsampled.contiguous(),
            targets=targets,
            scores=logits.gather(1, targets),
            probs=probs_all.gather(1, targets),
            top_indices=top.indices,
            top_probs=top.values,
            raw_maps=None if upsampled is maps else maps,
            layer=raw.layer,
            class_names=class_names,
            top_names=top_names,
            images=images,
            attributions=None if raw.attributions is None else raw.attributions.detach().float(),
            meta=meta,
        )

    def _flags(self, maps: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"blank": (B, K), "nonfinite": (B, K)}`` bool flags (on the CPU) of maps that are
        all zero or hold NaN or infinite values, with a warning naming them."""
        flat = maps.flatten(2)
        nonfinite = ~torch.isfinite(flat).all(dim=2)
        blank = (flat == 0).all(dim=2)
        flags = {"blank": blank.cpu(), "nonfinite": nonfinite.cpu()}
        for key, kind, what in (
            ("nonfinite", NonFiniteMapWarning, "maps holding NaN or infinite values"),
            ("blank", BlankMapWarning, "all-zero maps (nothing to show)"),
        ):
            hit = flags[key]
            if bool(hit.any()):
                classes = targets.tolist()
                pairs = [f"image {i} (class {classes[i][k]})" for i, k in hit.nonzero().tolist()]
                warnings.warn(
                    f"{self.name or type(self).__name__} returned {what} for "
                    f"{listed(pairs)} of the batch; flagged in meta[{key!r}]",
                    kind,
                    stacklevel=4,
                )
        return flags
