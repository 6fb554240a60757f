"""Compiled forward passes for jobs that run a network thousands of times without gradients.

Deletion/insertion curves (:mod:`convlens.metrics.faithfulness`) score ``2 (S - 1)`` perturbed
copies of every image for every map: 38,600 forward passes for 200 images, 5 methods and 20
steps. Eager PyTorch runs each layer of the network as its own kernel (convolution, then the
activation, then the padding of the next layer, each a pass over memory); ``torch.compile``
(TorchInductor) with *freezing* fuses the element-wise work into the convolutions and packs the
weights once: faster per image than the folded eager copy, at the price of a compilation that
only pays for long jobs (timings: ``benchmarks/RESULTS_METRICS.md``; when ``"auto"`` compiles:
:meth:`convlens.accel.Acceleration.compiles`).

:class:`FixedBatchForward` compiles for one batch size and pads smaller batches (a new batch
size would otherwise trigger a new compilation), checks the output for every new kind of input
against eager execution, and falls back to eager execution (with a log message) whenever
compilation fails (no C++ compiler, an operation Inductor cannot handle) or disagrees.
:func:`compiled_forward` keeps a few compiled forwards per network (the metrics' copy, occlusion
suffixes), so that a loop of metric calls (``convlens evaluate`` scores a few images at a time)
compiles once; an entry is rebuilt when the network's structure, settings, parameters or
buffers change, and a network that changes between every call stops being compiled after three
builds (:func:`convlens.accel.clear_caches` forgets them all).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from convlens.accel.fingerprint import fingerprint
from convlens.hooks.state import tf32_convolutions

__all__ = ["FixedBatchForward", "clear_compiled", "compiled_forward"]

log = logging.getLogger(__name__)

_CACHE: weakref.WeakKeyDictionary[
    nn.Module, dict[str, tuple[tuple[Any, ...], FixedBatchForward]]
] = weakref.WeakKeyDictionary()
_PER_OWNER = 4  # compiled forms kept per network (metrics copy, occlusion suffixes, ...)
_BUILDS: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
_MAX_BUILDS = 3  # compilations per network and tag before it stays eager


def clear_compiled() -> None:
    """Forget every network's compiled forwards and build counts (:func:`compiled_forward`)."""
    _CACHE.clear()
    _BUILDS.clear()


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence warnings issued inside torch itself (deprecation notices of the modules that
    ``torch.compile`` imports): they are not about the caller's code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch")
        yield


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().amax().clamp_min(1.0)
    return float((a.float() - b.float()).abs().amax() / scale)


class FixedBatchForward:
    """``net`` compiled by ``torch.compile`` for batches of exactly ``batch_size`` images.

    Smaller batches are padded with zeros (and the padding's outputs dropped), so that the last
    batch of a job does not trigger a second compilation; larger batches are the caller's to
    split. The first call with each kind of input (shapes, dtypes, device; every call under
    autocast) compiles, runs and compares the output with eager execution (relative error at
    most ``1000 eps`` of float32; of bfloat16 for 16-bit outputs or under autocast; ``1e-2``
    with TF32 on CUDA); if compilation fails or the outputs disagree, this and every later call
    run ``net`` eagerly.

    Args:
        net: a network in eval mode with frozen parameters (e.g. an
            :func:`~convlens.accel.folded.inference_copy`); called under ``no_grad``.
        batch_size: the compiled batch size.
        device: where ``net`` runs; on a CPU, Inductor's *freezing* (weights packed once,
            constants folded) is enabled.
        pad: pad smaller batches; with ``False`` they run eagerly instead (for networks with
            arguments that depend on the batch size, such as a ``view(n, -1)`` size).
    """

    def __init__(
        self, net: nn.Module, batch_size: int, device: torch.device, *, pad: bool = True
    ) -> None:
        self.net = net
        self.batch_size = batch_size
        self.device = device
        self.pad = pad
        self.compiled: bool | None = None
        """``None`` before the first call, then whether the compiled code is used."""
        self._checked: set[Any] = set()  # input signatures compared with eager execution
        options = {"freezing": True} if device.type == "cpu" else None
        with _quiet_torch():
            self._fn: Callable[[torch.Tensor], torch.Tensor] = torch.compile(
                net, dynamic=False, options=options
            )

    def _pad(self, args: tuple[Any, ...], k: int) -> tuple[Any, ...]:
        if k == self.batch_size:
            return args
        return tuple(_pad(a, k, self.batch_size) for a in args)

    def __call__(self, *args: Any) -> torch.Tensor:
        """The network's output on ``args`` (the first one a tensor with the batch size ``k``
        along dim 0; every tensor argument with ``k`` rows is padded together)."""
        k = args[0].shape[0]
        if self.compiled is False or k > self.batch_size or (k < self.batch_size and not self.pad):
            return self.net(*args)
        padded = self._pad(args, k)
        signature = tuple(
            (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in padded
        )
        if signature not in self._checked or torch.is_autocast_enabled(args[0].device.type):
            return self._checked_call(args, padded, k, signature)
        try:
            return self._fn(*padded)[:k]
        except Exception as exc:  # a recompilation that failed
            self._give_up(exc)
            return self.net(*args)

    def _give_up(self, exc: Exception) -> None:
        log.warning(
            "torch.compile failed (%s: %s); running the network eagerly",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        self.compiled = False

    def _checked_call(
        self, args: tuple[Any, ...], padded: tuple[Any, ...], k: int, signature: Any
    ) -> torch.Tensor:
        """Compiled and eager output on a new kind of input (shapes, dtypes, device; under
        autocast always): the compiled one if they agree, else eager from now on."""
        ref = self.net(*args)
        try:
            with _quiet_torch():
                got = self._fn(*padded)[:k]
        except Exception as exc:  # no C++ compiler, an unsupported operation, ...
            self._give_up(exc)
            return ref
        tol = 1000 * torch.finfo(torch.float32).eps
        if ref.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(
            ref.device.type
        ):
            tol = 1000 * torch.finfo(torch.bfloat16).eps
        elif ref.is_cuda and tf32_convolutions():
            tol = 1e-2
        err = _relative_error(got, ref)
        if not err <= tol:
            log.warning(
                "compiled network differs from eager (relative error %.2g > %.2g); running it "
                "eagerly",
                err,
                tol,
            )
            self.compiled = False
            return ref
        if self.compiled is None:
            log.info("network compiled (batch %d, relative error %.2g)", self.batch_size, err)
        self.compiled = True
        self._checked.add(signature)
        return got


def _pad(a: Any, k: int, size: int) -> Any:
    """``a`` padded with zero rows to ``size`` along dim 0 if it is a tensor with ``k`` rows."""
    if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != k:
        return a
    out = torch.cat([a, a.new_zeros((size - k, *a.shape[1:]))])
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def compiled_forward(
    owner: nn.Module,
    make_copy: Callable[[], nn.Module],
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    tag: str = "",
    pad: bool = True,
) -> FixedBatchForward:
    """The cached :class:`FixedBatchForward` of ``owner`` (the user's network) for ``tag`` (what
    is compiled: ``""`` for the whole network, a suffix's code for part of it), built from
    ``make_copy()`` when there is none for this batch size, device and dtype, or when
    ``owner``'s parameters or buffers changed since it was built. A few entries per network;
    they go away with the network."""
    key = (batch_size, str(device), dtype, pad, fingerprint(owner))
    entries = _CACHE.setdefault(owner, {})
    hit = entries.get(tag)
    if hit is not None and hit[0] == key:  # also a failed one: it runs eagerly, no retry
        return hit[1]
    fwd = FixedBatchForward(make_copy(), batch_size, device, pad=pad)
    builds = _BUILDS.setdefault(owner, {})
    builds[tag] = builds.get(tag, 0) + 1
    if builds[tag] > _MAX_BUILDS:
        # the model changes between every call (a buffer its forward updates, a training
        # loop): compiling again each time would cost more than it saves
        if builds[tag] == _MAX_BUILDS + 1:
            log.info("the model keeps changing between calls; not compiling it again")
        fwd.compiled = False
    entries.pop(tag, None)
    while len(entries) >= _PER_OWNER:
        entries.pop(next(iter(entries)))
    entries[tag] = (key, fwd)
    return fwd
