"""Finding structure in a model: which layer a ``name@call`` text means (:func:`parse_layer`,
:func:`resolve_call`), the global-average-pooling head that CAM needs, and the default layer of
the CAM family.

Detection is by observation, not by module names: one forward pass of a single image records
every module's output; the classifier is the last ``nn.Linear`` whose output is the model's
output, and the CAM layer is the last 4-D feature map whose spatial mean equals that linear
layer's input. This works however the pooling is written (module, ``F.adaptive_avg_pool2d``,
``x.mean((2, 3))``) and for modules called several times. Transformer layers (token sequences,
channels-last maps) are placed on their patch grid by :mod:`convlens.tokens`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.accel.fingerprint import structure_fingerprint
from convlens.errors import LayerError, UnsupportedModelError
from convlens.hooks.capture import CallCapture, call_error, capture_call, hooks, named_module
from convlens.hooks.state import model_state
from convlens.tokens import (
    MAX_PREFIX,
    TokenLayout,
    channel_count,
    detect_layout,
    is_grid,
    is_norm,
    patch_grid,
    stated_prefix,
)
from convlens.tokens import clear_cache as clear_token_cache
from convlens.validate import int_text

__all__ = [
    "GapHead",
    "LayerCall",
    "LayerRef",
    "absolute_call",
    "clear_cache",
    "default_layer",
    "find_gap_head",
    "parse_layer",
    "resolve_call",
]


@dataclass(frozen=True)
class LayerRef:
    """A module and which of its calls in one forward pass (``-1``: the last)."""

    name: str
    call: int = -1

    def __str__(self) -> str:
        return self.name if self.call == -1 else f"{self.name}@{self.call}"


@dataclass(frozen=True)
class GapHead:
    """A feature map that feeds global average pooling and a linear classifier.

    ``logits = fc.weight @ mean_hw(A) + fc.bias`` where ``A`` is the output of ``layer``.
    """

    layer: LayerRef
    fc_name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: TokenLayout | None = None
    """How ``layer``'s output maps to ``A`` (:mod:`convlens.tokens`); ``None``: it is ``A``."""


@dataclass
class _Scan:
    head: GapHead | None
    head_error: str | None
    last_spatial: LayerRef | None
    token_default: LayerRef | None = None


_CACHE: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[Any, ...], tuple[tuple[Any, ...], _Scan]]
] = weakref.WeakKeyDictionary()
"""Per network (weakly: an entry goes with its network) and input shape and dtype: the
network's fingerprint when it was scanned
(:func:`convlens.accel.fingerprint.structure_fingerprint`) and what the scan found. A network
changed in place since (a module replaced, weights loaded, a setting changed) no longer matches
and is scanned again."""


def clear_cache(net: nn.Module | None = None) -> None:
    """Forget what was observed of ``net`` (default layer, classifier head, patch grid), or of
    every network. Needed only after changes a fingerprint cannot see (values permuted inside a
    tensor through ``.data``, state hidden in other Python objects)."""
    if net is None:
        _CACHE.clear()
    else:
        _CACHE.pop(net, None)
    clear_token_cache(net)


def parse_layer(spec: str | LayerRef) -> LayerRef:
    """Parse ``"name"`` or ``"name@call"`` (call index, negative counts from the end)."""
    if isinstance(spec, LayerRef):
        return spec
    name, sep, call = spec.rpartition("@")
    number = int_text(call) if sep else None
    if number is not None:
        return LayerRef(name, number)
    return LayerRef(spec, -1)


@dataclass(frozen=True)
class LayerCall:
    """One call of one module of a network, found by :func:`resolve_call`.

    Attributes:
        ref: the layer as asked for.
        module: the module.
        call: which call, counted from 0 (``ref.call`` made absolute).
    """

    ref: LayerRef
    module: nn.Module
    call: int

    def capture(self, *, stop: bool = True) -> contextlib.AbstractContextManager[CallCapture]:
        """Capture this call's output in the block, ending the forward pass there with ``stop``
        (:func:`convlens.hooks.capture_call`)."""
        return capture_call(self.module, self.ref.name, self.call, stop=stop)


def absolute_call(ref: LayerRef, calls: int) -> int:
    """``ref.call`` counted from 0, for a module called ``calls`` times per forward pass.

    Raises:
        LayerError: the module is not called, or has no such call.
    """
    index = ref.call if ref.call >= 0 else calls + ref.call
    if not 0 <= index < calls:
        raise call_error(ref.name, ref.call, calls)
    return index


def resolve_call(
    net: nn.Module,
    layer: str | LayerRef,
    x: torch.Tensor,
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> LayerCall:
    """The module and call that ``layer`` (``"name"``, ``"name@call"`` or a :class:`LayerRef`)
    means in ``net``.

    A call counted from the end (``-1``, the default, is the last) is made absolute by one
    forward pass of ``x[:1]`` without gradients that counts the module's calls; a call counted
    from 0 needs no pass (a call the network never reaches is reported where it is captured,
    :meth:`convlens.hooks.CallCapture.output`).

    Args:
        net: the network.
        layer: the layer.
        x: an input of the network (only its first image runs).
        forward: what runs the network (default ``net`` itself), e.g. to turn its errors into
            clearer ones.

    Raises:
        LayerError: no such module (close names suggested), or it is not called, or has no
            such call.
    """
    ref = parse_layer(layer)
    module = named_module(net, ref.name)
    if ref.call >= 0:
        return LayerCall(ref, module, ref.call)
    calls = 0

    def count(_m: nn.Module, _args: Any, _out: Any) -> None:
        nonlocal calls
        calls += 1

    with torch.no_grad(), hooks([lambda: module.register_forward_hook(count)]):
        (net if forward is None else forward)(x[:1].detach())
    return LayerCall(ref, module, absolute_call(ref, calls))


def _scan(net: nn.Module, x: torch.Tensor) -> _Scan:
    key = (tuple(x.shape[1:]), x.dtype)
    stamp = structure_fingerprint(net)
    per_net = _CACHE.setdefault(net, {})
    hit = per_net.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    names = {m: n for n, m in net.named_modules()}
    calls: dict[str, int] = {}
    # (layer, its layout, spatial mean (1, C)), in call order; a token sequence's mean is
    # filled in once the patch grid is known (from its first rows and its sum).
    maps: list[tuple[LayerRef, TokenLayout | None, torch.Tensor | None]] = []
    spatial: list[LayerRef] = []
    sequences: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}
    last_grid_map = -1  # position in ``maps`` of the last (B, C, H, W) map on a grid of x
    linears: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, input, output)

    def record(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        nonlocal last_grid_map
        name = names[module]
        idx = calls.get(name, 0)
        calls[name] = idx + 1
        if name == "":
            return
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            ref = LayerRef(name, idx)
            maps.append((ref, None, out.detach().float().mean(dim=(2, 3))))
            spatial.append(ref)
            layout = detect_layout(out.shape, size, channels=channel_count(module))
            if layout.kind == "nhwc" and out.shape[0] == 1 and out.shape[1] * out.shape[2] > 1:
                maps.append((ref, layout, out.detach().float().mean(dim=(1, 2))))
            elif is_grid(*layout.grid, size):
                last_grid_map = len(maps) - 1
        elif (
            isinstance(out, torch.Tensor)
            and out.dim() == 3
            and out.shape[0] == 1  # the batch of images (not, e.g., Swin's windows)
            and out.is_floating_point()
        ):
            flat = out.detach().float()
            rows = flat[:, : MAX_PREFIX + 1]  # (shape, first rows, sum over tokens)
            sequences[len(maps)] = (tuple(out.shape), rows, flat.sum(dim=1))
            maps.append((LayerRef(name, idx), None, None))
        if isinstance(module, nn.Linear) and args and isinstance(args[0], torch.Tensor):
            linears.append((name, args[0].detach().float(), out.detach().float()))

    regs = [lambda m=m: m.register_forward_hook(record) for m in net.modules()]
    with model_state(net, eval_mode=True, grads=False), torch.no_grad(), hooks(regs):
        out = net(x[:1])
    if sequences:
        _place_tokens(net, x, maps, sequences)

    # Calls counted per name; turn call indices into "from the end" where it is the last call.
    def normal(ref: LayerRef) -> LayerRef:
        return LayerRef(ref.name, -1) if ref.call == calls[ref.name] - 1 else ref

    last_spatial = normal(spatial[-1]) if spatial else None
    head: GapHead | None = None
    error: str | None = None
    fc = None
    if isinstance(out, torch.Tensor):
        for name, inp, lin_out in reversed(linears):
            if lin_out.shape == out.shape and torch.allclose(lin_out, out.float(), atol=1e-5):
                fc = (name, inp)
                break
    if fc is None:
        error = "its output is not produced by an nn.Linear classifier"
    else:
        name, inp = fc
        vec = inp.flatten(1)
        tol = 1e-4 * (1.0 + float(vec.abs().max()))
        for ref, layout, mean in reversed(maps):
            if mean is not None and mean.shape == vec.shape and torch.allclose(mean, vec, atol=tol):
                linear = named_module(net, name)
                assert isinstance(linear, nn.Linear)
                head = GapHead(
                    layer=normal(ref),
                    fc_name=name,
                    weight=linear.weight.detach(),
                    bias=None if linear.bias is None else linear.bias.detach(),
                    layout=layout,
                )
                break
        if head is None:
            error = (
                f"the input of its classifier {name!r} is not the global average of any "
                "layer's feature map"
            )
    token_default = None
    tokens = [(i, ref, lay) for i, (ref, lay, _) in enumerate(maps) if lay is not None]
    if head is None and tokens and tokens[-1][0] > last_grid_map:
        later = [(ref, lay) for i, ref, lay in tokens if i > last_grid_map]
        found = _token_default(net, x, later)
        token_default = None if found is None else normal(found)
    scan = _Scan(
        head=head, head_error=error, last_spatial=last_spatial, token_default=token_default
    )
    per_net[key] = (stamp, scan)
    return scan


def _place_tokens(
    net: nn.Module,
    x: torch.Tensor,
    maps: list[tuple[LayerRef, TokenLayout | None, torch.Tensor | None]],
    sequences: dict[int, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]],
) -> None:
    """Fill in the layout and grid mean of the token sequences :func:`_scan` saw (those on no
    grid of the input stay without)."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    try:
        base = patch_grid(net, x)
    except LayerError:
        base = None
    prefix = stated_prefix(net)
    for i, (shape, rows, total) in sequences.items():
        try:
            layout = detect_layout(shape, size, base_grid=base, prefix=prefix)
        except LayerError:
            continue
        h, w = layout.grid
        if h * w == 1:  # no spatial extent (e.g. a pooled token), as for (B, C, 1, 1) maps
            continue
        mean = (total - rows[:, : layout.prefix].sum(dim=1)) / (h * w)
        maps[i] = (maps[i][0], layout, mean)


def _token_default(
    net: nn.Module, x: torch.Tensor, cands: list[tuple[LayerRef, TokenLayout]]
) -> LayerRef | None:
    """The default CAM layer of a transformer, by observation: the last token layer whose
    patch tokens the top class's score depends on, among the per-token norms if any (for a
    ViT pooled on its class token, the first norm of the last block, which feeds the last
    attention: pytorch-grad-cam's ``blocks[-1].norm1``; for a Swin pooled over its tokens, the
    final norm). One forward and backward pass of ``x[:1]``."""
    modules = {ref.name: named_module(net, ref.name) for ref, _ in cands}
    norms = [(ref, lay) for ref, lay in cands if is_norm(modules[ref.name])]
    cands = norms or cands
    wanted: dict[str, dict[int, TokenLayout]] = {}
    for ref, lay in cands:
        wanted.setdefault(ref.name, {})[ref.call] = lay
    outs: dict[LayerRef, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def keep(name: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> Any:
            idx = counts.get(name, 0)
            counts[name] = idx + 1
            if idx in wanted[name] and isinstance(out, torch.Tensor) and out.requires_grad:
                outs[LayerRef(name, idx)] = out
                return out.clone()
            return None

        return hook

    regs = [lambda n=n: modules[n].register_forward_hook(keep(n)) for n in wanted]
    x1 = x[:1].detach().requires_grad_(True)
    with model_state(net, eval_mode=True, grads=False), torch.enable_grad(), hooks(regs):
        out = net(x1)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or not outs:
            return None
        refs = [ref for ref, _ in cands if ref in outs]
        score = out[0, int(out[0].argmax())]
        grads = torch.autograd.grad(score, [outs[r] for r in refs], allow_unused=True)
    layouts = dict(cands)
    for ref, g in reversed(list(zip(refs, grads, strict=True))):
        if g is not None and bool(layouts[ref].to_maps(g).ne(0).any()):
            return ref
    # The score depends on no patch token anywhere (e.g. a zero-initialised head): every
    # layer gives a blank map; show the last token layer.
    return refs[-1]


def find_gap_head(net: nn.Module, x: torch.Tensor) -> GapHead:
    """The feature map feeding global average pooling and the linear classifier.

    Raises:
        UnsupportedModelError: the model has no such structure; the message names Grad-CAM as
            the method to use instead.
    """
    scan = _scan(net, x)
    if scan.head is None:
        raise UnsupportedModelError(
            f"CAM needs a model that ends in global average pooling and one linear layer, but "
            f"{scan.head_error}. Use Grad-CAM instead (method 'gradcam'), which works on any "
            "convolutional layer."
        )
    return scan.head


def default_layer(net: nn.Module, x: torch.Tensor) -> LayerRef:
    """The layer the CAM family uses when none is given.

    The feature map that feeds global average pooling when the model has one (the last
    convolutional map, as in the CAM and Grad-CAM papers; for a transformer pooled over its
    patch tokens, e.g. Swin, the final norm's tokens). Otherwise, when the last spatial output
    of the model is a token sequence or a channels-last map (:mod:`convlens.tokens`): the last
    per-token norm whose patch tokens the top class's score depends on, found by one backward
    pass (for a ViT or DeiT pooled on its class token, the first norm of the last block, which
    feeds the last attention: pytorch-grad-cam's ``blocks[-1].norm1``). Otherwise the last
    module output with a spatial extent larger than 1x1.

    Raises:
        LayerError: the model has no module with a 4-D output.
    """
    scan = _scan(net, x)
    if scan.head is not None:
        return scan.head.layer
    if scan.token_default is not None:
        return scan.token_default
    if scan.last_spatial is None:
        raise LayerError(
            "the model has no layer with a spatial (B, C, H, W) output to explain; "
            "use an input-gradient method such as 'saliency'"
        )
    return scan.last_spatial
