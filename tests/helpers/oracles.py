"""Independent reference computations the tests compare convlens against.

Each oracle computes its answer the slow, literal way (one image, one window, one channel or
one pixel at a time, plain autograd) and shares no code with the library beyond the model and
layer capture, so a test that compares the two can fail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convlens.hooks import layer_capture

__all__ = [
    "ablation_cam_brute_force",
    "features_and_grads",
    "input_gradient",
    "occlusion_brute_force",
    "receptive_field_brute_force",
    "score_cam_brute_force",
    "topk_brute_force",
]


def occlusion_brute_force(net, x, t, patch, stride, fill, logit=False):
    """Occlusion: one image at a time, one window at a time, plain Python loops.

    Each window (a ``patch`` x ``patch`` square every ``stride`` pixels, plus the last one flush
    with the border) is replaced by ``fill`` and the drop of the target's probability (``logit``:
    its logit) is averaged over the windows covering each pixel. Returns (B, H, W) float64.
    """
    b, _, h, w = x.shape
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        xi = x[i : i + 1]
        with torch.no_grad():

            def score(inp, c=int(t[i])):
                s = net(inp)[0]
                return float(s[c] if logit else torch.softmax(s, 0)[c])

            base = score(xi)
            total = torch.zeros(h, w, dtype=torch.float64)
            count = torch.zeros(h, w, dtype=torch.float64)
            y = 0
            ys = sorted(set([*list(range(0, h - patch + 1, stride)), h - patch]))
            xs = sorted(set([*list(range(0, w - patch + 1, stride)), w - patch]))
            for y in ys:
                for xx in xs:
                    occ = xi.clone()
                    occ[..., y : y + patch, xx : xx + patch] = fill[i][
                        ..., y : y + patch, xx : xx + patch
                    ]
                    total[y : y + patch, xx : xx + patch] += base - score(occ)
                    count[y : y + patch, xx : xx + patch] += 1
        out[i] = total / count
    return out


def features_and_grads(net, x, t):
    """For a net with ``features``, ``pool`` and ``fc`` (e.g. GapNet): the activations A from the
    model's own feature function and dS_t/dA by autograd, both detached."""
    a = net.features(x).detach().requires_grad_(True)
    logits = net.fc(net.pool(a).flatten(1))
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    return a.detach(), g


def input_gradient(net: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """d logit_t / d input of the first image of ``x`` by autograd: (C, H, W)."""
    xi = x.clone().requires_grad_(True)
    net(xi)[0, t].backward()
    assert xi.grad is not None
    return xi.grad[0]


def score_cam_brute_force(net, x, t, logit=False, softmax=False):
    """Score-CAM by the paper's formula, one image and one channel at a time, for a net with
    ``features``: each channel, upsampled and min-max rescaled, masks the input; its weight is
    the target's probability (``logit``: logit) on the masked copy (``softmax``: then a softmax
    over channels). Returns (B, h, w) at the feature resolution."""
    a = net.features(x).detach()
    out = torch.zeros(x.shape[0], *a.shape[-2:], dtype=x.dtype)
    for i in range(x.shape[0]):
        w = torch.zeros(a.shape[1], dtype=x.dtype)
        for c in range(a.shape[1]):
            m = F.interpolate(a[i : i + 1, c : c + 1], size=x.shape[-2:], mode="bilinear")
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            with torch.no_grad():
                o = net(x[i : i + 1] * m)[0]
            w[c] = o[t[i]] if logit else torch.softmax(o, 0)[t[i]]
        if softmax:
            w = torch.softmax(w, 0)
        out[i] = torch.relu((w[:, None, None] * a[i]).sum(0))
    return out


def ablation_cam_brute_force(net, x, t):
    """Ablation-CAM, one image and one channel at a time, for a net with ``features``, ``pool``
    and ``fc``: each channel's weight is the relative drop of the target's logit when that
    channel is zeroed. Returns (B, h, w) at the feature resolution."""
    a = net.features(x).detach()
    out = torch.zeros(x.shape[0], *a.shape[-2:], dtype=x.dtype)
    for i in range(x.shape[0]):
        with torch.no_grad():
            s = net.fc(net.pool(a[i : i + 1]).flatten(1))[0, t[i]]
        alpha = torch.zeros(a.shape[1], dtype=x.dtype)
        for c in range(a.shape[1]):
            ab = a[i : i + 1].clone()
            ab[:, c] = 0
            with torch.no_grad():
                sc = net.fc(net.pool(ab).flatten(1))[0, t[i]]
            alpha[c] = (s - sc) / s
        out[i] = torch.relu((alpha[:, None, None] * a[i]).sum(0))
    return out


def receptive_field_brute_force(
    net: nn.Module, layer: str, size: tuple[int, int], big: float = 100.0
) -> torch.Tensor:
    """``affects[i, j, y, x]``: changing input pixel ``(i, j)`` changes unit ``(y, x)`` of
    ``layer`` (``name`` or ``name@call``) on a float64 input of ``size``.

    Every pixel (all channels) is moved by ``+big`` and ``-big`` on two random images.
    """
    name, _, call = layer.partition("@")
    index = int(call) if call else -1
    h, w = size
    c = next(m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d))

    def run(x: torch.Tensor) -> torch.Tensor:
        with layer_capture(net, name) as cap, torch.no_grad():
            net(x.clone())  # the model may change its input in place
        return cap.output(index)

    affects = None
    for seed in (0, 1):
        base = torch.randn(
            (1, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        ref = run(base)
        for sign in (1.0, -1.0):
            xs = base.repeat(h * w, 1, 1, 1)
            pix = torch.arange(h * w)
            xs.view(h * w, c, h * w)[pix, :, pix] += sign * big
            changed = ((run(xs) - ref).abs() > 1e-9 * (1 + ref.abs())).any(dim=1)
            affects = changed if affects is None else affects | changed
    assert affects is not None
    return affects.view(h, w, *affects.shape[1:])


def topk_brute_force(batches: list[tuple[torch.Tensor, torch.Tensor]], k: int):
    """Per channel: the k images with the largest maximum, as (values, ids, ys, xs) lists, from
    (activations (N, C, H, W), image ids (N,)) batches by one full sort."""
    acts = torch.cat([a for a, _ in batches])
    ids = torch.cat([i for _, i in batches])
    _, c, _, w = acts.shape
    best, where = acts.flatten(2).max(dim=2)  # (N, C)
    out = []
    for ch in range(c):
        order = torch.argsort(best[:, ch], descending=True)[:k]
        out.append(
            (
                best[order, ch],
                ids[order],
                where[order, ch] // w,
                where[order, ch] % w,
            )
        )
    return out
