"""CAM methods whose channel weights come from forward passes: Score-CAM and Ablation-CAM."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from convlens.architecture import GapHead, LayerRef, find_gap_head, resolve_call
from convlens.errors import UnsupportedModelError
from convlens.hooks.capture import hooks, layer_capture
from convlens.methods.base import Context, Method, RawResult
from convlens.methods.cam import layer_layout_of, layout_meta
from convlens.methods.registry import register
from convlens.tokens import TokenLayout
from convlens.validate import PositiveFloat, PositiveInt

__all__ = ["AblationCAM", "ScoreCAM"]


def _activations(
    ctx: Context, ref: LayerRef
) -> tuple[torch.Tensor, torch.Tensor, TokenLayout, torch.Tensor]:
    """(feature map (B, C, h, w), logits, the layer's layout, the layer's own output)."""
    with torch.no_grad(), layer_capture(ctx.net, ref.name) as cap:
        logits = ctx.net(ctx.x)
        out = cap.output(ref.call)
    layout = layer_layout_of(ctx, ref, out)
    return layout.to_maps(out), logits, layout, out


def _per_sample_bytes(x: torch.Tensor) -> int:
    # Activation memory of a CNN forward is typically 10-40x the input; 32x is conservative.
    return int(x[0].numel() * x.element_size() * 32)


@register("scorecam")
class ScoreCAM(Method):
    """Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations").

    Each channel ``A_c``, upsampled to the input and min-max rescaled to [0, 1], masks the
    input: ``x * H_c``. Its weight is the target's score on the masked input,
    ``alpha_c = s_t(x * H_c)`` (softmax probability, or logit); ``M_t = ReLU(sum_c alpha_c A_c)``.
    ``channel_softmax=True`` turns the weights into a softmax over channels (pytorch-grad-cam's
    variant). Constant channels (dead units) all give the zero image as masked input, so they
    share one forward pass per image. All masked inputs of all images go through the model in
    batches under ``memory_mb``, inside ``torch.no_grad``, with no per-sample host synchronisation.

    With ``score="prob"`` the weights are computed from log-probabilities, rescaled so that the
    largest is 1: ``alpha_c = exp(log p_t(x * H_c) - L)`` with ``L = max_c log p_t(x * H_c)``.
    The map is the paper's divided by ``exp(L) > 0`` per image and target (``exp(L) M_t`` is
    the paper's map; ``L`` is kept in ``meta["log_scale"]``, (B, K)). The paper's own form
    fails on confident networks: when every masked copy is confidently another class, every
    ``p_t(x * H_c)`` underflows to exactly 0 in float32 (below about ``exp(-104)``) and the map
    is blank, although in exact arithmetic it is not.

    Args:
        score: ``"prob"`` (the paper) or ``"logit"``.
        channel_softmax: softmax the weights over channels.
        top_channels: use only the N channels with the largest mean activation per image, an
            approximation that divides the cost by C/N (the other channels get weight 0).
        batch_size: masked inputs per forward pass (default from ``memory_mb``).
        memory_mb: cap on one forward pass's estimated activation memory.
        align_corners: of the bilinear upsampling of the masks.
    """

    title = "Score-CAM"
    paper = "Wang et al. 2020"
    uses_gradients = False
    uses_layer = True

    def __init__(
        self,
        score: Literal["prob", "logit"] = "prob",
        channel_softmax: bool = False,
        top_channels: PositiveInt | None = None,
        batch_size: PositiveInt | None = None,
        memory_mb: PositiveFloat = 1024.0,
        align_corners: bool = False,
    ) -> None:
        if score not in ("prob", "logit"):
            raise ValueError(f"score must be 'prob' or 'logit', not {score!r}")
        self.score, self.channel_softmax, self.top_channels = score, channel_softmax, top_channels
        self.batch_size, self.memory_mb, self.align_corners = batch_size, memory_mb, align_corners

    def options(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "channel_softmax": self.channel_softmax,
            "top_channels": self.top_channels,
        }

    def compute(self, ctx: Context) -> RawResult:
        ref = ctx.layer_ref()
        x = ctx.x
        a, logits, layout, _ = _activations(ctx, ref)
        targets = ctx.targets(logits)
        b, c = a.shape[:2]
        if self.top_channels is not None and self.top_channels < c:
            chosen = a.mean(dim=(2, 3)).topk(self.top_channels, dim=1).indices  # (B, N)
        else:
            chosen = torch.arange(c, device=a.device).expand(b, c)
        n = chosen.shape[1]
        # On CPUs, batches beyond ~16 images get slower per image (measured: 16 masked images
        # per pass ran ~1.8x faster than 54 on 2 cores); GPUs like them large.
        cap = 16 if x.device.type == "cpu" else 256
        chunk = self.batch_size or max(
            1, min(cap, int(self.memory_mb * 2**20 // _per_sample_bytes(x)))
        )
        # With score="prob" the weights hold log-probabilities until the end (log 0 = -inf for
        # channels left out by top_channels); see the class docstring.
        log_prob = self.score == "prob"
        weights = torch.full(
            (b, targets.shape[1], c),
            float("-inf") if log_prob else 0.0,
            device=a.device,
            dtype=torch.float32,
        )
        # A constant channel (a dead ReLU unit: more than half of EfficientNet-Lite0's head
        # channels on a typical photo) rescales to an all-zero mask, so its masked input is the
        # zero image: one forward pass per image serves all of them, with identical results.
        flat_a = a.flatten(2)
        constant = (flat_a.amax(2) - flat_a.amin(2) == 0).gather(1, chosen)  # (B, N)
        img_all = torch.arange(b, device=a.device)[:, None].expand(b, n)
        live = ~constant.flatten()
        pairs_img, pairs_ch = img_all.flatten()[live], chosen.flatten()[live]
        with torch.no_grad():
            if constant.any():
                out = ctx.net(torch.zeros_like(x)).float()
                s0 = torch.log_softmax(out, dim=1) if log_prob else out
                s0 = s0.gather(1, targets)  # (B, K)
                ci, cn = constant.nonzero(as_tuple=True)
                weights[ci, :, chosen[ci, cn]] = s0[ci]
            total = int(pairs_img.numel())
            for start in range(0, total, chunk):
                ctx.pace(start, total)
                idx = torch.arange(start, min(start + chunk, total), device=a.device)
                img, ch = pairs_img[idx], pairs_ch[idx]
                m = a[img, ch].unsqueeze(1)  # (n, 1, h, w)
                m = F.interpolate(
                    m, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners
                )
                flat = m.flatten(1)
                lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
                m = ((flat - lo) / (hi - lo + 1e-8)).view_as(m)
                out = ctx.net(x[img] * m).float()
                s = torch.log_softmax(out, dim=1) if log_prob else out
                weights[img, :, ch] = s.gather(1, targets[img])
        meta: dict[str, Any] = layout_meta(layout)
        if self.channel_softmax:
            if log_prob:
                weights = weights.exp()  # tiny probabilities only make the softmax more even
            mask = torch.zeros_like(weights, dtype=torch.bool)
            mask.scatter_(2, chosen.unsqueeze(1).expand(-1, targets.shape[1], -1), True)
            weights = torch.softmax(weights.masked_fill(~mask, float("-inf")), dim=2)
        elif log_prob:
            log_scale = weights.amax(dim=2, keepdim=True)  # (B, K, 1): L = max_c log p_c
            weights = torch.exp(weights - log_scale)  # the largest weight is 1
            meta["log_scale"] = log_scale.squeeze(2)
        maps = torch.relu(torch.einsum("bkc,bchw->bkhw", weights.to(a.dtype), a))
        meta["forward_passes"] = (
            b + total + (b if bool(constant.any()) else 0)
        )  # clean, live, zeros
        return RawResult(maps, logits, targets, layer=str(ref), meta=meta)


@register("ablationcam")
class AblationCAM(Method):
    """Ablation-CAM (Desai & Ramaswamy 2020).

    The weight of channel ``c`` is the relative drop of the target's score when the channel is
    set to zero, ``alpha_c = (S_t - S_t^{(c=0)}) / S_t``; ``M_t = ReLU(sum_c alpha_c A_c)``.

    When the layer feeds global average pooling and a linear head, the ablated score is known
    in closed form, ``S_t - S_t^{(c=0)} = W_tc mean_ij A_cij``, so no extra forward pass is needed.
    Otherwise the network is run once up to the layer, and only the part after it is re-run for
    the ablated copies (the layer's output is replaced by a batch of copies with one channel
    zeroed each); when the part after the layer cannot take a larger batch (it mixes in
    tensors from before the layer that do not broadcast), the whole network is re-run.
    On a transformer's token layer, ablating channel ``c`` zeroes it in the patch tokens only
    (the feature map's channel; class and other prefix tokens are left as they were).

    Args:
        batch_size: ablated copies per forward pass of the part after the layer.
        exact: ``"auto"`` uses the closed form when it applies; ``"never"`` always re-runs.
    """

    title = "Ablation-CAM"
    paper = "Desai & Ramaswamy 2020"
    uses_gradients = False
    uses_layer = True

    def __init__(
        self, batch_size: PositiveInt = 64, exact: Literal["auto", "never"] = "auto"
    ) -> None:
        self.batch_size, self.exact = batch_size, exact

    def options(self) -> dict[str, Any]:
        return {"exact": self.exact}

    def compute(self, ctx: Context) -> RawResult:
        ref = ctx.layer_ref()
        head: GapHead | None = None
        if self.exact == "auto":
            try:
                head = find_gap_head(ctx.net, ctx.x)
            except UnsupportedModelError:
                head = None
            if head is not None and (head.layer.name, head.layer.call) != (ref.name, ref.call):
                head = None
        a, logits, layout, out = _activations(ctx, ref)
        targets = ctx.targets(logits)
        score = logits.gather(1, targets).float()  # (B, K)
        if head is not None:
            w = head.weight.to(a.dtype)[targets].float()  # (B, K, C)
            drop = w * a.float().mean(dim=(2, 3)).unsqueeze(1)
            passes = 0
        else:
            drop, passes = self._ablate(ctx, ref, a, targets, score, layout, out)
        safe = torch.where(score != 0, score, torch.ones_like(score))
        alpha = drop / safe.unsqueeze(2)
        maps = torch.relu(torch.einsum("bkc,bchw->bkhw", alpha.to(a.dtype), a))
        return RawResult(
            maps,
            logits,
            targets,
            layer=str(ref),
            meta={"closed_form": head is not None, "suffix_passes": passes, **layout_meta(layout)},
        )

    def _ablate(
        self,
        ctx: Context,
        ref: LayerRef,
        a: torch.Tensor,
        targets: torch.Tensor,
        score: torch.Tensor,
        layout: TokenLayout,
        out: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        b, c = a.shape[:2]
        drop = torch.zeros(b, targets.shape[1], c, device=a.device)
        passes = 0
        target = resolve_call(ctx.net, ref, ctx.x)
        module, call = target.module, target.call
        for i in range(b):
            for start in range(0, c, self.batch_size):
                ctx.pace(i * c + start, b * c)
                chans = torch.arange(start, min(start + self.batch_size, c), device=a.device)
                copies = a[i : i + 1].expand(len(chans), -1, -1, -1).clone()
                copies[torch.arange(len(chans)), chans] = 0
                # back to the layer's own layout (prefix tokens kept as they were)
                copies = layout.from_maps(copies, out[i : i + 1])
                logits = self._suffix(ctx, module, call, i, copies)
                passes += 1
                s = logits.float().gather(1, targets[i : i + 1].expand(len(chans), -1))
                drop[i, :, chans] = (score[i : i + 1] - s).T
        return drop, passes

    @staticmethod
    def _suffix(
        ctx: Context, module: nn.Module, call: int, i: int, copies: torch.Tensor
    ) -> torch.Tensor:
        """Logits of image ``i`` with the output of ``module``'s call ``call`` replaced by
        ``copies``: the layers before it see one image, the layers after it the copies."""
        calls = [0]

        def swap(_m: nn.Module, _a: Any, out: Any) -> Any:
            k = calls[0]
            calls[0] += 1
            return copies if k == call else None

        with torch.no_grad():
            try:
                with hooks([lambda: module.register_forward_hook(swap)]):
                    out = ctx.net(ctx.x[i : i + 1])
                if isinstance(out, torch.Tensor) and out.shape[0] == copies.shape[0]:
                    return out
            except RuntimeError:
                pass
            # The rest of the network mixes in batch-1 tensors or shapes (e.g. a reshape to
            # the input's batch size): re-run the whole network on copies of the image.
            calls[0] = 0
            x = ctx.x[i : i + 1].expand(copies.shape[0], -1, -1, -1)
            with hooks([lambda: module.register_forward_hook(swap)]):
                return ctx.net(x)
