"""Explicit attention weights for one call: :func:`explicit_attention`.

Vision transformers usually run their attention through fused kernels
(``F.scaled_dot_product_attention``, or the fast path of ``nn.MultiheadAttention``) that never
form the attention matrix, or form it outside the autograd graph. For the call,
:func:`explicit_attention` makes every recognised attention module compute
``A = softmax(q k^T / sqrt(d))`` explicitly, from the module's own projections, as a tensor
of the autograd graph that the rest of the forward pass uses, and records it:

- timm's ``Attention`` (``VisionTransformer``, DeiT), and a class of another package also
  named ``Attention`` and written like it (a ``qkv`` projection, ``num_heads``,
  ``fused_attn``, ``attn_drop``; windowed attention excluded; timm's other attention classes,
  e.g. channel attention (XCiT) or differential attention, are not taken for it): the
  module's own non-fused branch
  (``fused_attn = False`` for the call); the matrix is read as the output of its ``attn_drop``
  (a forward hook), the tensor multiplied with the values;
- ``nn.MultiheadAttention`` (torchvision's ``VisionTransformer`` and models built like it): the
  module's ``forward`` is replaced for the call by an explicit computation from
  ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` (the fused path computes the same
  function; equal to float tolerance).

Everything changed (the ``fused_attn`` flags, the instance ``forward``, the hooks) is restored
in ``finally``, also when registration fails halfway.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens.errors import UnsupportedModelError

__all__ = ["SUPPORTED_ATTENTION", "AttentionRecord", "attention_modules", "explicit_attention"]

#: What :func:`explicit_attention` recognises, for messages.
SUPPORTED_ATTENTION = (
    "timm vision transformers (timm.layers.Attention: ViT, DeiT, and modules laid out like it) "
    "and torchvision-style vision transformers (nn.MultiheadAttention self-attention)"
)


@dataclass
class AttentionRecord:
    """The attention matrices of the forward passes run inside :func:`explicit_attention`.

    Attributes:
        weights: one (B, heads, N, N) tensor per attention call, in call order (for a ViT,
            block order); part of the autograd graph when the pass builds one.
        names: the module name of each entry.
    """

    weights: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def clear(self) -> None:
        """Forget what was recorded (before another forward pass)."""
        self.weights.clear()
        self.names.clear()


def _timm_attention_class() -> type | None:
    """timm's ``Attention`` class when timm is already imported (a timm model exists), else
    ``None``: timm is never imported here."""
    layers = sys.modules.get("timm.layers.attention")
    return getattr(layers, "Attention", None) if layers is not None else None


def attention_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of ``net`` that :func:`explicit_attention` can make explicit, as
    ``(name, module)`` in registration order."""
    timm_cls = _timm_attention_class()
    found = []
    for name, m in net.named_modules():
        if isinstance(m, nn.MultiheadAttention) or (
            timm_cls is not None and isinstance(m, timm_cls) and _timm_layout(m)
        ):
            found.append((name, m))
        elif type(m).__name__ == "Attention" and _timm_layout(m) and not _windowed(m):
            found.append((name, m))  # written like timm's Attention (global, not windowed)
    return found


def _windowed(m: nn.Module) -> bool:
    """Whether ``m`` attends within windows (Swin's ``window_size``, Twins' ``ws``)."""
    return hasattr(m, "window_size") or hasattr(m, "ws")


def _timm_layout(m: nn.Module) -> bool:
    """Whether ``m`` follows timm's ``Attention`` layout: a ``qkv`` linear projection, an integer
    ``num_heads``, a ``fused_attn`` switch whose off branch forms the attention matrix, and the
    ``attn_drop`` module that matrix passes through (read by :func:`explicit_attention`)."""
    return (
        isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "num_heads", None), int)
        and hasattr(m, "fused_attn")
        and isinstance(getattr(m, "attn_drop", None), nn.Module)
    )


def _mha_forward(
    m: nn.MultiheadAttention, name: str, record: AttentionRecord
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """An explicit ``forward`` for ``nn.MultiheadAttention`` ``m`` (same signature) that records
    its per-head attention weights."""

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UnsupportedModelError(
                f"attention module {name!r} is called with a mask; attention methods support "
                "unmasked self-attention only"
            )
        if m.bias_k is not None or m.add_zero_attn or query.dim() != 3:
            raise UnsupportedModelError(
                f"attention module {name!r} uses add_bias_kv, add_zero_attn or unbatched "
                "inputs; attention methods do not support these"
            )
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n_q, _ = query.shape
        n_k = key.shape[1]
        heads, d = m.num_heads, m.head_dim
        if m._qkv_same_embed_dim:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q = b_k = b_v = None
        if m.in_proj_bias is not None:
            b_q, b_k, b_v = m.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(b, n_q, heads, d).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(b, n_k, heads, d).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(b, n_k, heads, d).transpose(1, 2)
        attn = torch.softmax((q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1), dim=-1)
        record.weights.append(attn)
        record.names.append(name)
        used = F.dropout(attn, p=m.dropout) if m.training and m.dropout > 0 else attn
        out = (used @ v).transpose(1, 2).reshape(b, n_q, heads * d)
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        if not m.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights

    return forward


@contextlib.contextmanager
def explicit_attention(net: nn.Module) -> Iterator[AttentionRecord]:
    """For the ``with`` block, make every recognised attention module of ``net`` compute its
    attention matrix explicitly and record it (see the module docstring).

    Yields:
        The :class:`AttentionRecord` the forward passes inside fill.

    Raises:
        UnsupportedModelError: ``net`` has no recognised attention module (the message names
            what is supported).
    """
    modules = attention_modules(net)
    if not modules:
        raise UnsupportedModelError(
            f"{type(net).__name__} has no attention module convlens recognises; attention "
            f"methods support {SUPPORTED_ATTENTION}"
        )
    record = AttentionRecord()
    undo: list[Callable[[], None]] = []
    try:
        for name, m in modules:
            if isinstance(m, nn.MultiheadAttention):
                had = "forward" in m.__dict__
                old: Any = m.__dict__.get("forward")
                m.forward = _mha_forward(m, name, record)  # type: ignore[method-assign]
                undo.append(_restore_forward(m, had, old))
            else:
                flag = m.fused_attn
                m.fused_attn = False
                undo.append(_restore_flag(m, flag))
                handle = m.attn_drop.register_forward_hook(_timm_hook(name, record))
                undo.append(handle.remove)
        yield record
    finally:
        for step in reversed(undo):
            step()


def _restore_forward(m: nn.Module, had: bool, old: Any) -> Callable[[], None]:
    def restore() -> None:
        if had:
            m.forward = old  # type: ignore[method-assign]
        else:
            del m.forward

    return restore


def _restore_flag(m: nn.Module, flag: Any) -> Callable[[], None]:
    def restore() -> None:
        m.fused_attn = flag

    return restore


def _timm_hook(name: str, record: AttentionRecord) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        record.weights.append(output)
        record.names.append(name)

    return hook
