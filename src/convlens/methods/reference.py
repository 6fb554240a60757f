"""A literal deconvnet (Zeiler & Fergus 2014, §2.1), for conv / ReLU / max-pool stacks.

This is the paper's procedure written out step by step, kept small and obvious on purpose: it is
the reference that the rule-based :class:`~convlens.methods.rules.Deconvnet` is tested against.

1. Forward pass, recording at every max-pool the *switches*: the location of each window's
   maximum.
2. From a signal placed on a layer's feature map, go down the stack:
   - max-pool: **unpool** by placing each value at its switch location (values of overlapping
     windows that share a location add up);
   - ReLU: **rectify** the reconstruction, ``ReLU(R)``;
   - convolution: **filter** with the transposed version of the same filters
     (``conv_transpose2d`` with the layer's weights, stride, padding, dilation; no bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["reference_deconvnet"]


@dataclass
class _Step:
    module: nn.Module
    input_shape: torch.Size
    switches: torch.Tensor | None = None


def _pool_params(pool: nn.MaxPool2d) -> dict[str, object]:
    return {
        "kernel_size": pool.kernel_size,
        "stride": pool.stride,
        "padding": pool.padding,
        "dilation": pool.dilation,
        "ceil_mode": pool.ceil_mode,
    }


def reference_deconvnet(
    stack: nn.Sequential, x: torch.Tensor, upto: int, signal: torch.Tensor
) -> torch.Tensor:
    """Project ``signal``, placed on the output of ``stack[upto]``, down to pixels.

    Args:
        stack: an ``nn.Sequential`` of ``Conv2d``, ``ReLU`` and ``MaxPool2d`` modules.
        x: (B, C, H, W) input.
        upto: index of the layer whose output receives the signal.
        signal: tensor shaped like that layer's output.

    Returns:
        The reconstruction, shaped like ``x``.
    """
    steps: list[_Step] = []
    h = x
    with torch.no_grad():
        for module in list(stack)[: upto + 1]:
            step = _Step(module, h.shape)
            if isinstance(module, nn.MaxPool2d):
                h, step.switches = F.max_pool2d(h, return_indices=True, **_pool_params(module))
            elif isinstance(module, (nn.Conv2d, nn.ReLU)):
                h = module(h)
            else:
                raise TypeError(f"the reference handles Conv2d, ReLU, MaxPool2d, not {module}")
            steps.append(step)
        if signal.shape != h.shape:
            raise ValueError(f"signal shape {tuple(signal.shape)} != layer output {tuple(h.shape)}")
        r = signal
        for step in reversed(steps):
            m = step.module
            if isinstance(m, nn.MaxPool2d):
                assert step.switches is not None
                b, c, hh, ww = step.input_shape
                up = torch.zeros(b, c, hh * ww, dtype=r.dtype, device=r.device)
                up.scatter_add_(2, step.switches.flatten(2), r.flatten(2))  # unpool
                r = up.view(step.input_shape)
            elif isinstance(m, nn.ReLU):
                r = torch.relu(r)  # rectify the reconstruction
            else:
                assert isinstance(m, nn.Conv2d)
                r = _transposed_conv(r, m, step.input_shape)
    return r


def _transposed_conv(r: torch.Tensor, conv: nn.Conv2d, input_shape: torch.Size) -> torch.Tensor:
    """The same filters, transposed; output padding chosen to give back the input size."""
    if isinstance(conv.padding, str):
        raise TypeError("the reference needs explicit integer padding")
    sizes = []
    for dim in range(2):
        natural = (
            (r.shape[2 + dim] - 1) * conv.stride[dim]
            - 2 * conv.padding[dim]
            + conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            + 1
        )
        sizes.append(input_shape[2 + dim] - natural)
    return F.conv_transpose2d(
        r,
        conv.weight,
        stride=conv.stride,
        padding=conv.padding,
        output_padding=tuple(sizes),
        groups=conv.groups,
        dilation=conv.dilation,
    )
