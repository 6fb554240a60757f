"""BatchNorm-folded copies of a network (accelerator ``Acceleration.fold_batchnorm``).

Deletion/insertion curves (:mod:`convlens.metrics.faithfulness`) and naive occlusion run only
forward passes of a network that does not change during the call; input-gradient methods
(saliency, integrated gradients) differentiate with respect to the input only. For both the
copy made here

- folds every eval-mode ``BatchNorm2d`` into the convolution that feeds it (Ioffe & Szegedy 2015
  normalise with running statistics in eval mode, an affine map per channel, so
  ``BN(W * x + b) = (s W) * x + s (b - mu) + beta`` with ``s = gamma / sqrt(var + eps)``;
  :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`), and
- stores weights in ``channels_last`` memory format (NHWC), which oneDNN and cuDNN convolve
  faster than NCHW.

Both change only the order of floating-point operations: the copy's logits equal the original's
to float rounding, and :func:`inference_copy` checks this on an example batch before returning.
The user's network is never modified.
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from convlens.accel.fingerprint import fingerprint
from convlens.hooks.capture import hooks
from convlens.hooks.state import model_state, tf32_convolutions

if TYPE_CHECKING:
    from convlens.models.base import ConvlensModel

__all__ = [
    "batchnorm_affine",
    "cached_inference_copy",
    "clear_inference_copies",
    "copy_keeping_layer",
    "fold_batchnorm",
    "has_forward_hooks",
    "has_hooks",
    "inference_copy",
]

log = logging.getLogger(__name__)


def _conv_bn_pairs(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Pairs ``(conv, bn)`` where the BatchNorm's input is the convolution's output tensor.

    Found by observing one forward pass on ``example[:1]``. A pair is kept only when both
    modules are called exactly once (a shared module cannot be folded for one of its uses).
    """
    names = {m: n for n, m in net.named_modules()}
    conv_out: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    found: list[tuple[str, str]] = []

    def after_conv(m: nn.Module, _args: Any, out: Any) -> None:
        calls[names[m]] = calls.get(names[m], 0) + 1
        if isinstance(out, torch.Tensor):
            conv_out[id(out)] = (names[m], out)  # keep the tensor: ids are not reused meanwhile

    def before_bn(m: nn.Module, args: Any) -> None:
        calls[names[m]] = calls.get(names[m], 0) + 1
        inp = args[0] if args else None
        hit = conv_out.get(id(inp))
        if hit is not None and hit[1] is inp:
            found.append((hit[0], names[m]))

    regs = []
    for m in net.modules():
        if type(m) is nn.BatchNorm2d and m.track_running_stats and m.running_mean is not None:
            regs.append(lambda m=m: m.register_forward_pre_hook(before_bn))
        elif isinstance(m, nn.Conv2d):
            regs.append(lambda m=m: m.register_forward_hook(after_conv))
    with hooks(regs), torch.no_grad():
        net(example[:1])
    return [(c, b) for c, b in found if calls[c] == 1 and calls[b] == 1]


def fold_batchnorm(net: nn.Module, example: torch.Tensor) -> int:
    """Fold eval-mode BatchNorm layers into the convolutions that feed them, **in place**.

    For a convolution ``y = W * x + b`` followed by ``BN(y) = gamma (y - mu) / sqrt(var + eps)
    + beta`` with running statistics (eval mode), the pair becomes one convolution with
    ``W' = s W`` and ``b' = s (b - mu) + beta``, ``s = gamma / sqrt(var + eps)`` per output
    channel, and the BatchNorm is replaced by ``nn.Identity``. Only valid for inference in eval
    mode; :func:`inference_copy` applies it to a copy.

    Args:
        net: the network to change (in eval mode).
        example: a (B, 3, H, W) input used to trace which BatchNorm follows which convolution.

    Returns:
        The number of BatchNorm layers folded.
    """
    pairs = _conv_bn_pairs(net, example)
    _fold_pairs(net, pairs)
    return len(pairs)


def batchnorm_affine(
    bn: nn.BatchNorm2d, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as a per-channel affine map ``y = scale x + shift``:
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean scale`` (Ioffe & Szegedy 2015).

    Args:
        bn: a BatchNorm with running statistics.
        dtype: compute in this dtype (default: the statistics' own).

    Returns:
        ``(scale, shift)``, each of shape (C,).
    """
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = dtype or bn.running_var.dtype
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def _fold_pairs(net: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each ``(conv, bn)`` pair of :func:`_conv_bn_pairs`, in place, with
    :func:`torch.nn.utils.fusion.fuse_conv_bn_weights`. The arithmetic runs in at least float32
    and is rounded once, to the convolution's dtype."""
    modules = dict(net.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            assert bn.running_mean is not None and bn.running_var is not None
            dtype = torch.promote_types(conv.weight.dtype, torch.float32)

            def up(t: torch.Tensor | None, dtype: torch.dtype = dtype) -> torch.Tensor | None:
                return None if t is None else t.detach().to(dtype)

            weight, bias = fuse_conv_bn_weights(
                up(conv.weight),
                up(conv.bias),
                up(bn.running_mean),
                up(bn.running_var),
                bn.eps,
                up(bn.weight),
                up(bn.bias),
            )
            conv.weight.copy_(weight)
            conv.bias = nn.Parameter(bias.detach().to(conv.weight), requires_grad=False)
            parent_name, _, child = bn_name.rpartition(".")
            parent = modules[parent_name] if parent_name else net
            parent._modules[child] = nn.Identity()


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = a.abs().amax().clamp_min(1.0)
    return float((a - b).abs().amax() / scale)


def inference_copy(
    model: nn.Module | ConvlensModel,
    example: torch.Tensor,
    *,
    fold: bool = True,
    channels_last: bool = True,
) -> nn.Module:
    """A copy of the network for fast no-grad inference: BatchNorm folded, ``channels_last``.

    The copy is in eval mode with parameters that do not require gradients. Its logits on
    ``example`` are compared with the original network's (in eval mode); if they differ by more
    than float rounding (relative to the largest logit: ``1000 eps`` of the dtype, about 1e-4 in
    float32; 1e-2 with TF32 convolutions on CUDA) - e.g. a convolution's output is also used
    elsewhere besides the BatchNorm - the plain eval-mode copy is returned instead. Below
    float32 (bfloat16, float16: ``1000 eps`` would be 8 and 1 - any fold would pass) the fold
    is checked on float32 copies of the network instead, at the float32 tolerance. Feed it
    inputs in ``channels_last`` format when ``channels_last`` is set (any layout works, that one
    is fastest).

    Args:
        model: the classifier; it is not modified.
        example: a small (B, 3, H, W) input batch on the model's device.
        fold: fold BatchNorm into convolutions (:func:`fold_batchnorm`).
        channels_last: convert 4-D weights to ``torch.channels_last``.

    Returns:
        The copy (an ``nn.Module`` mapping inputs to logits).

    Raises:
        Exception: whatever ``copy.deepcopy`` or registering a forward hook raises for a network
            that cannot be copied or hooked (e.g. TorchScript); the metrics then fall back to
            running the model itself.
    """
    return _make_copy(model, example, fold=fold, channels_last=channels_last)[0]


def _make_copy(
    model: nn.Module | ConvlensModel, example: torch.Tensor, *, fold: bool, channels_last: bool
) -> tuple[nn.Module, int | None]:
    """:func:`inference_copy` and the number of BatchNorm layers folded into it (``None``:
    the fold was rejected and the copy is the plain network)."""
    from convlens.models.base import unwrap  # the wrapper's module imports this package

    net, _ = unwrap(model)
    fast = copy.deepcopy(net).eval().requires_grad_(False)
    if not (fold or channels_last):
        return fast, 0
    probe = example[:2]
    pairs = _conv_bn_pairs(fast, probe) if fold else []
    _fold_pairs(fast, pairs)
    folded = len(pairs)
    fast.convlens_folded_convs = frozenset(conv for conv, _ in pairs)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    dtype = probe.dtype if probe.is_floating_point() else torch.float32
    low = torch.finfo(dtype).eps > torch.finfo(torch.float32).eps
    with torch.no_grad():
        got = fast(probe.contiguous(memory_format=torch.channels_last) if channels_last else probe)
    if low:
        # 16-bit rounding would hide a wrong fold (a logit error of 70% passed in bfloat16):
        # check the same fold on a float32 copy, in float32. The 16-bit copy differs from it
        # by rounding only.
        dtype, probe = torch.float32, probe.float()
        check = copy.deepcopy(net).eval().requires_grad_(False).float()
        with torch.no_grad():
            ref = check(probe)
            _fold_pairs(check, pairs)
            got = check(probe)
        del check
    else:
        with model_state(net, eval_mode=True, grads=False), torch.no_grad():
            ref = net(probe).float()
    tol = 1000 * torch.finfo(dtype).eps
    if probe.is_cuda and dtype == torch.float32 and tf32_convolutions():
        tol = 1e-2  # TF32 convolutions (10-bit mantissa) round both models at about 1e-3
    err = _max_relative_error(ref.float(), got.float())
    if err > tol:
        log.info("inference copy differs from the model (%.2g > %.2g); not folding", err, tol)
        return copy.deepcopy(net).eval().requires_grad_(False), None
    log.debug("inference copy: %d BatchNorm layers folded, relative error %.2g", folded, err)
    return fast, folded


@dataclass(frozen=True)
class _Kept:
    """What :func:`cached_inference_copy` keeps for one network and slot (device, dtype,
    layout): the copy (``None``: the network runs as it is) and the network's fingerprint when
    it was made; ``changes_itself``: the network's own forward pass changed its parameters or
    buffers, so no copy can stand in for it (whatever its fingerprint becomes)."""

    key: tuple[Any, ...]
    copy: nn.Module | None
    changes_itself: bool = False


_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _Kept]] = (
    weakref.WeakKeyDictionary()
)
"""Per network (weakly: it goes with the network), per slot ``(device, dtype,
channels_last)``: the kept copy. Keyed on the network and the settings only; nothing counted
across calls (:func:`clear_inference_copies` empties it)."""


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (``None`` for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def has_forward_hooks(net: nn.Module) -> bool:
    """Whether a forward (pre-)hook on one of ``net``'s modules, or a global one, would see the
    passes: then a copy of the network must not stand in for it."""
    from torch.nn.modules import module as nn_module

    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    return bool(hooked or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def has_hooks(net: nn.Module) -> bool:
    """:func:`has_forward_hooks`, or a backward (pre-)hook on a module or a global backward
    hook: gradients through a copy would reach the copy's modules, not the network's."""
    from torch.nn.modules import module as nn_module

    if (
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    ):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in net.modules()
    )


def clear_inference_copies() -> None:
    """Drop every network's kept copies (:func:`cached_inference_copy`), e.g. to free the
    memory of their second set of weights."""
    _COPIES.clear()


def cached_inference_copy(
    net: nn.Module, example: torch.Tensor, *, channels_last: bool = True
) -> nn.Module | None:
    """:func:`inference_copy` of ``net``, kept between calls while ``net`` is unchanged.

    Input-gradient methods (saliency, integrated gradients, SmoothGrad around them) run the
    copy instead of the network; making it (a deep copy, the fold and its check) costs a few
    passes, so it is kept, one per network and slot (device, dtype and layout: it holds a
    second set of the network's weights; :func:`clear_inference_copies` frees it), and rebuilt
    when the network's structure, settings, parameters or buffers change (the
    :func:`~convlens.accel.fingerprint.fingerprint`). The copy goes away with the network.

    Whether a call gets a copy depends on the network, its state and the slot only, never on
    earlier calls; the cache only saves the cost of making the copy again (the results are the
    same to float rounding either way). A network whose weights change between calls (a
    training loop explaining as it goes) gets a new copy every call: that costs speed (a deep
    copy and two probe passes a call), never a different result. A network whose own forward
    pass changes its parameters or buffers (a buffer updated on every call; seen as its
    fingerprint changing across the copy's check pass, after which its buffers are put back)
    always runs as it is, since a copy would update its own state instead of the network's;
    that is kept for the network and slot, so it is not checked again. Not seen: such changes
    of a 16-bit network (its check runs on float32 copies) and changes hidden in plain Python
    objects.

    Args:
        net: the network (in eval mode, as inside a method call).
        example: a (B, 3, H, W) input on the network's device, for the fold's check.
        channels_last: convert the copy's 4-D weights to ``torch.channels_last``.

    Returns:
        The copy, or ``None`` when the network itself must run: a hook would miss the copy's
        passes (:func:`has_hooks`), a torch function mode is active (e.g. an outer
        :func:`convlens.hooks.backprop_rule` block, whose rule is meant for the network's own
        layers), a module is in training mode, the fold changed the network's outputs (a
        convolution's output also used elsewhere), the network cannot be copied (e.g.
        TorchScript), or its forward pass changes it.
    """
    if has_hooks(net) or torch.overrides._get_current_function_mode_stack():
        return None
    if any(m.training for m in net.modules()):
        return None
    slot = (example.device, example.dtype, channels_last)
    kept = _COPIES.setdefault(net, {})
    hit = kept.get(slot)
    if hit is not None and hit.changes_itself:
        return None
    key = fingerprint(net)
    if hit is not None and hit.key == key:
        return hit.copy
    kept.pop(slot, None)  # stale: let its weights go before the new copy is made
    buffers = {name: (_version(b), b.detach().clone()) for name, b in net.named_buffers()}
    fast: nn.Module | None
    try:
        fast, folded = _make_copy(
            net, example[:2].detach().clone(), fold=True, channels_last=channels_last
        )
    except Exception as exc:  # an uncopyable or scripted model, or inputs it cannot take
        log.info("no inference copy of the model (%s: %s)", type(exc).__name__, exc)
        return None  # not kept: the next call (other inputs) tries again
    if fingerprint(net) != key:
        with torch.no_grad():  # the check pass leaves no trace in the network's buffers
            for name, b in net.named_buffers():
                version, before = buffers.get(name, (_version(b), b))
                if _version(b) != version and before.shape == b.shape:
                    b.copy_(before)
        log.info("the model's forward pass changes the model; running it as it is")
        kept[slot] = _Kept(key, None, changes_itself=True)
        return None
    if folded is None:
        fast = None  # the plain network, copied: nothing gained
    kept[slot] = _Kept(key, fast)
    return fast


def copy_keeping_layer(
    net: nn.Module, example: torch.Tensor, layer: str, *, channels_last: bool = True
) -> nn.Module | None:
    """:func:`cached_inference_copy` of ``net`` when its module ``layer`` computes what the
    network's does, for methods that read a layer's output and its gradient (the CAM family).

    The copy keeps every module name. A folded BatchNorm became ``nn.Identity`` and outputs
    ``BN(conv(x))`` as before; a convolution whose BatchNorm was folded into it outputs the
    normalised map instead of its own, and so may a module holding such a convolution (e.g. a
    ``Sequential`` ending in it, with the BatchNorm outside). A copy is returned only when
    ``layer`` holds no folded convolution at all (compared by module identity, so a layer
    reached under another name is caught too).

    Returns:
        The copy, or ``None`` when the network itself must run (see
        :func:`cached_inference_copy`, or ``layer`` holds a folded convolution).
    """
    fast = cached_inference_copy(net, example, channels_last=channels_last)
    if fast is None:
        return None
    try:
        target = net.get_submodule(layer.strip())
    except AttributeError:
        return None  # the method reports the unknown layer itself
    inside = {id(m) for m in target.modules()}
    for conv in getattr(fast, "convlens_folded_convs", None) or ():
        if id(net.get_submodule(conv)) in inside:
            return None
    return fast
