"""Compiled forward passes for jobs that run a network thousands of times without gradients.

Deletion/insertion curves (:mod:`convlens.metrics.faithfulness`) score ``2 (S - 1)`` perturbed
copies of every image for every map: 38,600 forward passes for 200 images, 5 methods and 20
steps. Eager PyTorch runs each layer of the network as its own kernel (convolution, then the
activation, then the padding of the next layer, each a pass over memory); ``torch.compile``
(TorchInductor) with *freezing* fuses the element-wise work into the convolutions and packs the
weights once. On the 2-core CPU of the development machine this makes EfficientNet-Lite0 1.35x
faster per image than the fused eager copy (138 vs 102 images/s at batch 64, 2 threads,
``benchmarks/RESULTS_METRICS.md``) and costs 7-30 s of compilation, so it only pays for long
jobs.

:class:`FixedBatchForward` compiles for one batch size and pads smaller batches (a new batch
size would otherwise trigger a new compilation), checks the output for every new kind of input
against eager execution, and falls back to eager execution (with a log message) whenever
compilation fails (no C++ compiler, an operation Inductor cannot handle) or disagrees.
:func:`compiled_forward` keeps a few compiled forwards per network (the metrics' copy, occlusion
suffixes), so that a loop of metric calls (``convlens evaluate`` scores a few images at a time)
compiles once; an entry is rebuilt when the network's structure, settings, parameters or
buffers change, and a network that changes between every call stops being compiled after three
builds. The time rule of ``compile="auto"`` (:func:`should_compile`) counts a network's eager
time over the whole process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from convlens.hooks import tf32_convolutions

__all__ = [
    "AUTO_COMPILE_SECONDS",
    "FixedBatchForward",
    "compiled_forward",
    "compiler_available",
    "eager_seconds",
    "record_eager_seconds",
    "should_compile",
]

log = logging.getLogger(__name__)

AUTO_COMPILE_SECONDS = 60.0
"""``compile="auto"`` compiles once a network's eager forward passes in this process, spent and
expected, reach this many seconds (compilation itself takes 7-30 s on a CPU)."""

_CACHE: weakref.WeakKeyDictionary[
    nn.Module, dict[str, tuple[tuple[Any, ...], FixedBatchForward]]
] = weakref.WeakKeyDictionary()
_PER_OWNER = 4  # compiled forms kept per network (metrics copy, occlusion suffixes, ...)
_BUILDS: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()
_MAX_BUILDS = 3  # compilations per network and tag before it stays eager
_EAGER_SECONDS: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def compiler_available() -> bool:
    """Whether TorchInductor can build CPU kernels here: a C++ compiler on ``PATH`` (``$CXX``,
    ``g++``, ``c++`` or ``clang++``)."""
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return any(shutil.which(n) for n in names if n)


def eager_seconds(net: nn.Module) -> float:
    """Seconds this process has spent in eager forward passes of ``net``'s metric copies."""
    return _EAGER_SECONDS.get(net, 0.0)


def record_eager_seconds(net: nn.Module, seconds: float) -> None:
    """Add ``seconds`` of eager forward passes to ``net``'s account (see :func:`should_compile`)."""
    _EAGER_SECONDS[net] = _EAGER_SECONDS.get(net, 0.0) + seconds


def should_compile(net: nn.Module, device: torch.device, expected_seconds: float) -> bool:
    """The ``compile="auto"`` rule: on a CPU with a C++ compiler, once the eager time spent on
    ``net`` plus the eager time this call is expected to take reaches
    :data:`AUTO_COMPILE_SECONDS`. GPUs are left to explicit ``compile=True``; the environment
    variable ``CONVLENS_AUTO_COMPILE=0`` (or ``false``, ``no``, ``off``) turns the rule off
    (``compile=True`` still works)."""
    setting = os.environ.get("CONVLENS_AUTO_COMPILE", "1").strip().lower()
    off = setting in ("0", "false", "no", "off")
    if device.type != "cpu" or off:
        return False
    if eager_seconds(net) + expected_seconds < AUTO_COMPILE_SECONDS:
        return False
    return compiler_available()


def _fingerprint(net: nn.Module) -> tuple[Any, ...]:
    """Changes when ``net``'s structure or any parameter or buffer changes: every module's
    identity, type and settings (``extra_repr``: stride, eps, inplace, ...), every tensor's
    storage, version counter (``None`` for inference tensors, which have none) and shape, and
    a summary of every tensor's values (``.data`` writes bypass the version counters).

    The summary is each floating tensor's L2 norm and maximum (signed: a weight multiplied by
    -1 shows), NaN-safe, taken with ``torch._foreach_norm`` / ``_foreach_max`` (a few fused
    kernels per device and dtype, no copy of the weights, one host synchronisation: this runs
    before every cached call, also on a GPU; a few milliseconds on one CPU thread for
    EfficientNet-Lite0's 4.7M values). Other tensors (integer buffers such as BatchNorm's
    counters) count by their values, or by their sum and a position-weighted sum when there
    are many. Each module's plain attributes (numbers, strings, tensors that are neither
    parameters nor buffers) and a ``forward`` replaced on the instance count too. Not seen:
    values permuted within a tensor through ``.data`` (same norm and maximum, no version
    bump), and changes hidden in other Python objects; rebuild by changing the network in a
    way that shows, or pass ``fuse=False`` / ``compile=False``."""
    modules = tuple(
        (name, id(m), type(m).__qualname__, m.extra_repr(), *_attributes(m))
        for name, m in net.named_modules()
    )
    tensors = [*net.parameters(), *net.buffers()]
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for (_, dtype), group in groups.items():
            if dtype.is_floating_point or dtype.is_complex:
                real = [torch.view_as_real(t) if t.is_complex() else t for t in group]
                parts.append(torch.stack(torch._foreach_norm(real, 2)).double())
                # signed (a weight times -1 shows), without allocating a copy of the weights
                parts.append(torch.stack(_foreach_max(real)).double())
            else:
                flat = torch.cat([t.reshape(-1) for t in group]).double()
                if flat.numel() > 4096:
                    ramp = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
                    flat = torch.stack([flat.sum(), (flat * ramp.remainder(997.0)).sum()])
                parts.append(flat)
        sums = torch.nan_to_num(torch.cat([p.cpu() for p in parts])).tolist() if parts else []
    state = tuple(
        (t.data_ptr(), None if t.is_inference() else t._version, tuple(t.shape)) for t in tensors
    )
    return modules, state, tuple(sums)


def _foreach_max(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor maxima (``torch._foreach_max`` where this PyTorch has it)."""
    fn = getattr(torch, "_foreach_max", None)
    if fn is not None and all(t.numel() for t in tensors):
        return list(fn(tensors))
    return [t.amax() if t.numel() else t.new_zeros(()) for t in tensors]


_PLAIN = (bool, int, float, str, type(None))


def _attributes(m: nn.Module) -> tuple[Any, ...]:
    """What a module holds besides parameters, buffers and submodules that its forward may
    read: plain values, tensors (by storage and version) and a ``forward`` set on the
    instance (by identity)."""
    out: list[Any] = []
    for k, v in m.__dict__.items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _PLAIN):
            out.append((k, v))
        elif isinstance(v, (tuple, list)) and all(isinstance(e, _PLAIN) for e in v):
            out.append((k, tuple(v)))  # e.g. a stride kept as a list
        elif isinstance(v, torch.Tensor):
            out.append((k, v.data_ptr(), None if v.is_inference() else v._version))
        elif k == "forward" or callable(v):
            out.append((k, id(v)))
    return tuple(out)


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
            :func:`~convlens.models.inference.inference_copy`); called under ``no_grad``.
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
    key = (batch_size, str(device), dtype, pad, _fingerprint(owner))
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
