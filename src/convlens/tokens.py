"""Token layers: the one place where layer outputs that are not (B, C, H, W) maps are understood.

Vision transformers compute on token sequences. A ViT or DeiT layer returns ``(B, N, C)``: ``N``
tokens, of which the first ``N - h w`` are *prefix* tokens (the class token, DeiT's distillation
token, register tokens) and the rest one token per patch of an ``h x w`` grid, in row-major
order. Swin (in timm) keeps its features channels-last, ``(B, H, W, C)``. The CAM family needs
a ``(B, C, h, w)`` map, so :class:`TokenLayout` says how one output maps to one, and
:meth:`TokenLayout.to_maps` / :meth:`TokenLayout.from_maps` do it (and undo it).

Everything is found by observation, as for CNNs (:mod:`convlens.architecture`):

- the *patch grid* is the spatial size of the last ``Conv2d`` output before the first 3-D output
  of the network (the patch embedding, one forward pass that stops there,
  :func:`patch_grid`); without such a convolution, an attribute of the model gives the patch
  size (timm ``patch_embed.patch_size``, torchvision ``patch_size``, Hugging Face
  ``config.patch_size``);
- a ``(B, N, C)`` output lies on the patch grid, or on a grid halved ``k`` times (Swin's patch
  merging), with ``N - h w`` prefix tokens (fewer than ``h w`` and at most
  :data:`MAX_PREFIX`); when several grids fit, timm's ``num_prefix_tokens`` decides, else the
  output is refused in one line;
- a 4-D output is channels-last when its last dimension is the channel count of the layer
  (``out_features`` of its last ``Linear``, ``normalized_shape`` of a ``LayerNorm``...) and its
  second is not; without such a count, when dimensions 1-2 form a grid of the input and
  dimensions 2-3 do not. Otherwise (and always for convolutional layers) it is ``(B, C, H, W)``
  and passes unchanged.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from convlens.accel.fingerprint import structure_fingerprint
from convlens.errors import LayerError
from convlens.hooks.capture import StopForward, hooks, stoppable
from convlens.hooks.state import model_state

__all__ = [
    "MAX_PREFIX",
    "TokenLayout",
    "channel_count",
    "clear_cache",
    "detect_layout",
    "is_grid",
    "is_norm",
    "layer_layout",
    "maps_of",
    "patch_grid",
    "stated_prefix",
]

#: The most prefix tokens (class, distillation, registers) a token sequence may carry.
MAX_PREFIX = 16

#: How many times a grid may be halved below the patch grid (Swin's patch merging).
_MAX_MERGES = 5

LayoutKind = Literal["nchw", "tokens", "nhwc"]


@dataclass(frozen=True)
class TokenLayout:
    """How one layer output maps to a ``(B, C, h, w)`` feature map.

    Attributes:
        kind: ``"nchw"`` (already a map), ``"tokens"`` (``(B, N, C)``, prefix tokens first,
            then the grid row by row) or ``"nhwc"`` (channels last).
        grid: ``(h, w)`` of the map.
        prefix: tokens before the grid (class, distillation, register tokens); 0 unless
            ``kind == "tokens"``.
    """

    kind: LayoutKind
    grid: tuple[int, int]
    prefix: int = 0

    def to_maps(self, out: torch.Tensor) -> torch.Tensor:
        """The ``(B, C, h, w)`` map of an output in this layout (a view where possible; the
        prefix tokens are dropped). Leading dimensions beyond the batch are kept:
        ``(B, K, N, C)`` gives ``(B, K, C, h, w)``."""
        h, w = self.grid
        if self.kind == "nchw":
            return out
        if self.kind == "nhwc":
            return out.movedim(-1, -3)
        patches = out[..., self.prefix :, :]
        return patches.transpose(-1, -2).unflatten(-1, (h, w))

    def from_maps(self, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`to_maps`: ``maps`` (n, C, h, w) back to this layout, the prefix tokens
        taken from ``like`` (an output in this layout, batch 1 or n)."""
        if self.kind == "nchw":
            return maps
        if self.kind == "nhwc":
            return maps.movedim(-3, -1)
        tokens = maps.flatten(-2).transpose(-1, -2)
        prefix = like[:, : self.prefix, :].expand(maps.shape[0], -1, -1)
        return torch.cat([prefix.to(tokens.dtype), tokens], dim=1)

    def describe(self, shape: Sequence[int]) -> str:
        """One line for ``convlens layers`` and messages: ``"tokens 197x192 -> 14x14 grid + 1
        prefix"`` for an output of shape ``shape``."""
        h, w = self.grid
        if self.kind == "nchw":
            return f"map {h}x{w}"
        if self.kind == "nhwc":
            return f"channels-last {h}x{w}x{shape[-1]} -> {h}x{w} grid"
        text = f"tokens {shape[-2]}x{shape[-1]} -> {h}x{w} grid"
        return text + (f" + {self.prefix} prefix" if self.prefix else "")

    def as_meta(self) -> dict[str, Any]:
        """The layout as plain values, for a result's ``meta["layout"]``."""
        return {"kind": self.kind, "grid": list(self.grid), "prefix": self.prefix}


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalises each token (``LayerNorm``, ``RMSNorm`` and look-alikes)."""
    rms = getattr(nn, "RMSNorm", None)
    if isinstance(module, nn.LayerNorm) or (rms is not None and isinstance(module, rms)):
        return True
    name = type(module).__name__
    return name.endswith(("LayerNorm", "RMSNorm")) and not name.endswith("2d")


def _own_channels(module: nn.Module) -> tuple[int, bool] | None:
    """(channel count, channels first) from a module's own parameters."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, True
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm):
        if isinstance(module, nn.GroupNorm):
            return module.num_channels, True
        return module.num_features, True
    if isinstance(module, nn.Linear):
        return module.out_features, False
    if is_norm(module):
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, Sequence) and len(shape) == 1:
            return int(shape[0]), False
    return None


def channel_count(module: nn.Module) -> int | None:
    """The channel count a module's output carries, seen in its parameters: its own
    (``Conv2d.out_channels``, ``Linear.out_features``, a norm's size) or, for a container, that
    of its last submodule that has one. ``None`` when none is seen."""
    own = _own_channels(module)
    if own is not None:
        return own[0]
    for sub in reversed(list(module.modules())[1:]):
        own = _own_channels(sub)
        if own is not None:
            return own[0]
    return None


def is_grid(h: int, w: int, size: tuple[int, int]) -> bool:
    """Whether (h, w) is the input ``size`` divided by one integer stride (floor or ceil)."""
    big_h, big_w = size
    if h < 1 or w < 1 or h > big_h or w > big_w:
        return False
    for s in {max(1, big_h // h), max(1, -(-big_h // h)), max(1, big_w // w)}:
        if h in (big_h // s, -(-big_h // s)) and w in (big_w // s, -(-big_w // s)):
            return True
    return False


_GRIDS: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[int, ...], tuple[tuple[Any, ...], tuple[int, int] | None]]
] = weakref.WeakKeyDictionary()
"""Per network (weakly: an entry goes with its network) and input shape: the fingerprint of
the network when its grid was found (:func:`convlens.accel.fingerprint.structure_fingerprint`)
and the grid. A network changed in place (a module replaced, a stride set, weights loaded) no longer
matches its fingerprint and is observed again."""


def clear_cache(net: nn.Module | None = None) -> None:
    """Forget the patch grids found (:func:`patch_grid`) of ``net``, or of every network."""
    if net is None:
        _GRIDS.clear()
    else:
        _GRIDS.pop(net, None)


def _attribute_patch(net: nn.Module) -> tuple[int, int] | None:
    """The patch size a model states (timm, torchvision, Hugging Face); ``None`` when it
    states none. Raises when its modules state different sizes."""
    found: set[tuple[int, int]] = set()
    holders: list[Any] = list(net.modules())
    config = getattr(net, "config", None)
    if config is not None:
        holders.append(config)
    for holder in holders:
        value = getattr(holder, "patch_size", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add((value, value))
        elif (
            isinstance(value, Sequence)
            and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)
        ):
            found.add((int(value[0]), int(value[1])))
    if len(found) > 1:
        sizes = ", ".join(f"{a}x{b}" for a, b in sorted(found))
        raise LayerError(
            f"the model states several patch sizes ({sizes}) "
            "and has no patch-embedding convolution to observe; cannot place its tokens on a grid"
        )
    return found.pop() if found else None


def patch_grid(net: nn.Module, x: torch.Tensor) -> tuple[int, int] | None:
    """The token grid of ``net`` for inputs shaped like ``x``, by observation.

    One no-grad forward pass of ``x[:1]`` in eval mode that stops at the first module returning
    a 3-D tensor (a token sequence): the grid is the spatial size of the last ``Conv2d`` output
    before it (the patch embedding). Without such a convolution, the patch size the model
    states (:func:`_attribute_patch`) divides the input size. Cached per network and input
    shape, and found again when the network's fingerprint changed since
    (:func:`convlens.accel.fingerprint.structure_fingerprint`: modules, settings, parameters
    and buffers); :func:`clear_cache` forgets.

    Returns:
        ``(h, w)``, or ``None`` when the model shows no patch grid.

    Raises:
        LayerError: the model states conflicting patch sizes.
    """
    key = tuple(x.shape[1:])
    stamp = structure_fingerprint(net)
    per_net = _GRIDS.setdefault(net, {})
    hit = per_net.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    convs: list[tuple[int, int]] = []
    seen_tokens = False

    def record(module: nn.Module, _args: Any, out: Any) -> None:
        nonlocal seen_tokens
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(module, nn.Conv2d) and out.dim() == 4:
            convs.append((int(out.shape[2]), int(out.shape[3])))
        elif out.dim() == 3:
            seen_tokens = True
            raise StopForward

    plain = [m for m in net.modules() if not isinstance(m, torch.jit.ScriptModule)]
    regs = [lambda m=m: m.register_forward_hook(record) for m in plain]
    with (
        model_state(net, eval_mode=True, grads=False),
        torch.no_grad(),
        hooks(regs),
        stoppable(),
    ):
        net(x[:1].detach())
    grid: tuple[int, int] | None = convs[-1] if seen_tokens and convs else None
    if grid is None:
        patch = _attribute_patch(net)
        if patch is not None:
            grid = (int(x.shape[-2]) // patch[0], int(x.shape[-1]) // patch[1])
    per_net[key] = (stamp, grid)
    return grid


def _token_grids(
    n: int, size: tuple[int, int], base: tuple[int, int] | None
) -> list[tuple[tuple[int, int], int]]:
    """Grids (and prefix counts) that ``n`` tokens may lie on."""
    if base is not None:
        # the patch grid, then halved k times (Swin's patch merging; padded or not)
        grids = [
            (op(base[0], 2**k), op(base[1], 2**k))
            for k in range(_MAX_MERGES + 1)
            for op in (lambda a, b: -(-a // b), lambda a, b: a // b)
        ]
    else:
        big_h, big_w = size
        strides = range(1, max(big_h, big_w) + 1)
        grids = [(big_h // s, big_w // s) for s in strides if big_h % s == 0 == big_w % s]
    found: dict[tuple[int, int], int] = {}
    for h, w in grids:
        if h < 1 or w < 1:
            continue
        prefix = n - h * w
        if 0 <= prefix <= MAX_PREFIX and prefix < h * w:
            found[(h, w)] = prefix
    return list(found.items())


def detect_layout(
    shape: Sequence[int],
    size: tuple[int, int],
    *,
    base_grid: tuple[int, int] | None = None,
    channels: int | None = None,
    prefix: int | None = None,
    name: str = "",
) -> TokenLayout:
    """The layout of one layer output, from its shape.

    Args:
        shape: the output's shape (``(B, C, H, W)``, ``(B, H, W, C)`` or ``(B, N, C)``).
        size: the input's ``(H, W)``.
        base_grid: the patch grid (:func:`patch_grid`), for token sequences.
        channels: the layer's channel count (:func:`channel_count`), for 4-D outputs.
        prefix: the prefix-token count the model states (timm ``num_prefix_tokens``), used only
            to choose between grids that fit equally.
        name: the layer's name, for messages.

    Raises:
        LayerError: the output is neither a feature map nor a token sequence on a grid of the
            input, or several grids fit.
    """
    shape = tuple(int(s) for s in shape)
    label = f"layer {name!r}" if name else "the layer"
    if len(shape) == 4:
        if channels is not None:
            if shape[1] == channels:
                return TokenLayout("nchw", (shape[2], shape[3]))
            if shape[3] == channels:
                return TokenLayout("nhwc", (shape[1], shape[2]))
        elif is_grid(shape[1], shape[2], size) and not is_grid(shape[2], shape[3], size):
            return TokenLayout("nhwc", (shape[1], shape[2]))
        return TokenLayout("nchw", (shape[2], shape[3]))
    if len(shape) == 3:
        fits = _token_grids(shape[1], size, base_grid)
        if len(fits) > 1 and prefix is not None:
            fits = [f for f in fits if f[1] == prefix] or fits
        if len(fits) == 1:
            (grid, pre) = fits[0]
            return TokenLayout("tokens", grid, pre)
        if not fits:
            where = f" (patch grid {base_grid[0]}x{base_grid[1]})" if base_grid else ""
            raise LayerError(
                f"{label} has output shape {shape}: {shape[1]} tokens do not lie on a grid of "
                f"the {size[0]}x{size[1]} input{where}; CAM methods need a (B, C, H, W) map or "
                "a (B, N, C) token sequence over patches (`convlens layers MODEL`)"
            )
        options = ", ".join(f"{h}x{w} + {p} prefix" for (h, w), p in fits)
        raise LayerError(
            f"{label} has output shape {shape}: its {shape[1]} tokens fit several grids "
            f"({options}); choose a layer of a model with a patch-embedding convolution"
        )
    raise LayerError(
        f"{label} has output shape {shape}; CAM methods need a (B, C, H, W) feature map or "
        "a (B, N, C) token sequence. Pick a convolutional or token layer (`convlens layers MODEL`)."
    )


def stated_prefix(net: nn.Module) -> int | None:
    """The prefix-token count the model states (timm's ``num_prefix_tokens``), if any."""
    value = getattr(net, "num_prefix_tokens", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def layer_layout(
    net: nn.Module, module: nn.Module, out: torch.Tensor, x: torch.Tensor, name: str = ""
) -> TokenLayout:
    """The layout of ``module``'s output ``out`` in ``net`` run on ``x``: what
    :func:`detect_layout` finds with the layer's channel count and, for token sequences, the
    observed patch grid (one extra, early-stopped forward pass, cached).

    Raises:
        LayerError: see :func:`detect_layout`.
    """
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if out.dim() == 4:
        layout = detect_layout(out.shape, size, channels=channel_count(module), name=name)
    else:
        base = patch_grid(net, x) if out.dim() == 3 else None
        layout = detect_layout(
            out.shape, size, base_grid=base, prefix=stated_prefix(net), name=name
        )
    if layout.kind != "nchw" and out.shape[0] != x.shape[0]:
        raise LayerError(
            f"layer {name!r} has output shape {tuple(out.shape)}, whose first dimension is not "
            f"the batch of {x.shape[0]} image(s) (e.g. attention windows); choose a layer "
            "that keeps one feature map per image (`convlens layers MODEL`)"
        )
    return layout


def maps_of(
    net: nn.Module, module: nn.Module, out: torch.Tensor, x: torch.Tensor, name: str = ""
) -> tuple[torch.Tensor, TokenLayout]:
    """``out`` as a ``(B, C, h, w)`` map and its layout (:func:`layer_layout`)."""
    layout = layer_layout(net, module, out, x, name)
    return layout.to_maps(out), layout
