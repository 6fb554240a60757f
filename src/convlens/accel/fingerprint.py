"""The cache key of the accelerators' per-network caches: a fingerprint that changes whenever
the network's structure, settings, parameters or buffers change."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fingerprint", "structure_fingerprint"]


def fingerprint(net: nn.Module) -> tuple[Any, ...]:
    """Changes when ``net``'s structure or any parameter or buffer changes: every module's
    identity, type and settings (``extra_repr``: stride, eps, inplace, ...), every tensor's
    storage, version counter (``None`` for inference tensors, which have none) and shape, and
    a summary of every tensor's values (``.data`` writes bypass the version counters).

    The summary is each floating tensor's L2 norm and maximum (signed: a weight multiplied by
    -1 shows), NaN-safe, taken with ``torch._foreach_norm`` / ``_foreach_max`` (a few fused
    kernels per device and dtype, no copy of the weights, one host synchronisation: this runs
    before every cached call, also on a GPU). Other tensors (integer buffers such as BatchNorm's
    counters) count by their values, or by their sum and a position-weighted sum when there
    are many. Each module's plain attributes (numbers, strings, tensors that are neither
    parameters nor buffers) and a ``forward`` replaced on the instance count too. Not seen:
    values permuted within a tensor through ``.data`` (same norm and maximum, no version
    bump), and changes hidden in other Python objects; rebuild by changing the network in a
    way that shows, or clear the caches (:func:`convlens.accel.clear_caches`)."""
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


def structure_fingerprint(net: nn.Module) -> tuple[Any, ...]:
    """:func:`fingerprint` without the summary of the tensors' values: every module's identity,
    type, settings and plain attributes, every parameter's and buffer's storage, version
    counter, shape, dtype and device. It reads no tensor data (microseconds per module, also
    on a GPU), so it fits caches consulted on every call whose answers depend on what the
    network is rather than on the exact values of its weights (the default layer, the patch
    grid). Seen: a module replaced or reconfigured, weights loaded or changed in place
    (``load_state_dict``, ``mul_``, an optimiser step); not seen: writes through ``.data``."""
    modules = tuple(
        (name, id(m), type(m).__qualname__, m.extra_repr(), *_attributes(m))
        for name, m in net.named_modules()
    )
    state = tuple(
        (
            t.data_ptr(),
            None if t.is_inference() else t._version,
            tuple(t.shape),
            t.dtype,
            t.device,
        )
        for t in [*net.parameters(), *net.buffers()]
    )
    return modules, state


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
