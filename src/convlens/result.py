"""The one result type of every explanation method."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from convlens.validate import fraction, in_range

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ["PER_IMAGE_META", "Explanation"]

#: Entries of :attr:`Explanation.meta` that hold one row per image (cut by
#: :meth:`Explanation.select`).
PER_IMAGE_META = ("blank", "nonfinite", "delta", "log_scale")


@dataclass
class Explanation:
    """Maps produced by one method for a batch of images.

    Shapes use ``B`` images, ``K`` targets per image (1 unless several classes were asked for,
    e.g. ``top_k=3``), input size ``H x W``.

    Attributes:
        method: registry name of the method (``"gradcam"``).
        maps: (B, K, H, W) float32 maps at input resolution; larger means more important for the
            target. Not normalised (see :meth:`normalized`).
        targets: (B, K) class indices explained.
        scores: (B, K) unnormalised class scores (logits) of the targets on the unchanged input.
        probs: (B, K) softmax probabilities of the targets.
        top_indices: (B, 5) the model's five most probable classes per image.
        top_probs: (B, 5) their probabilities.
        raw_maps: (B, K, h, w) maps at the resolution the method computed them (layer resolution
            for CAM methods), or ``None`` when equal to ``maps``.
        layer: name of the layer used, when the method uses one.
        class_names: (B, K) nested list of target names, when the class list is known.
        top_names: (B, 5) nested list of the names of ``top_indices``.
        images: (B, 3, H, W) the inputs in [0, 1] for display, when known.
        attributions: (B, K, 3, H, W) per-channel signed attributions for the pixel-space
            methods (saliency, deconvnet, guided backprop ...), when the method has them;
            ``maps`` is then a per-pixel reduction of them.
        meta: method options and timings (``seconds``), and per image and target, (B, K) bool
            tensors on the CPU: ``blank``, maps that are all zero (nothing to show), and
            ``nonfinite``, maps holding NaN or infinite values; the method warns when any is
            set (:class:`~convlens.errors.BlankMapWarning`,
            :class:`~convlens.errors.NonFiniteMapWarning`).
    """

    method: str
    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    top_indices: torch.Tensor
    top_probs: torch.Tensor
    raw_maps: torch.Tensor | None = None
    layer: str | None = None
    class_names: list[list[str]] | None = None
    top_names: list[list[str]] | None = None
    images: torch.Tensor | None = None
    attributions: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of images ``B``."""
        return int(self.maps.shape[0])

    @property
    def num_targets(self) -> int:
        """Number of targets per image ``K``."""
        return int(self.maps.shape[1])

    def normalized(self, percentile: float | None = None) -> torch.Tensor:
        """Maps rescaled per image and target to [0, 1] (min-max); constant maps become 0.

        Args:
            percentile: clip each map to its [100 - p, p] percentiles before rescaling, so a few
                extreme pixels do not wash out the rest (gradient maps); default
                ``meta["display_percentile"]`` when the method sets it, else no clipping.

        Raises:
            InputError: ``percentile`` is not a number in [50, 100].
        """
        if percentile is None:
            percentile = self.meta.get("display_percentile")
        else:
            percentile = in_range(percentile, "percentile", 50, 100)
        return _normalized(self.maps, percentile)

    @property
    def is_signed(self) -> bool:
        """Whether the maps are signed attributions (evidence for and against the target:
        gradient x input, integrated gradients), drawn with :meth:`signed`."""
        return self.meta.get("display") == "signed"

    def signed(self, percentile: float | None = None) -> torch.Tensor:
        """Maps divided per image and target by their largest magnitude, in [-1, 1] (zero
        stays zero; all-zero maps stay 0).

        Args:
            percentile: divide by this percentile of ``|map|`` instead and clip, so a few
                extreme pixels do not wash out the rest; default
                ``meta["display_percentile"]`` when the method sets it, else the maximum.

        Raises:
            InputError: ``percentile`` is not a number in (0, 100].
        """
        if percentile is None:
            percentile = self.meta.get("display_percentile")
        else:
            percentile = in_range(percentile, "percentile", 0, 100, low_open=True)
        return _signed(self.maps, percentile)

    def target_name(self, i: int, k: int = 0) -> str:
        """Name of target ``k`` of image ``i`` (its index when no class list is known)."""
        if self.class_names is not None:
            return self.class_names[i][k]
        return f"class {int(self.targets[i, k])}"

    def select(self, index: int | slice) -> Explanation:
        """The explanation of one image (kept batched, B=1) or a slice of images."""
        idx = slice(index, index + 1) if isinstance(index, int) else index

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        def cut_list(v: list[list[str]] | None) -> list[list[str]] | None:
            return None if v is None else v[idx]

        meta = {
            k: v[idx] if k in PER_IMAGE_META and isinstance(v, torch.Tensor) else v
            for k, v in self.meta.items()
        }
        return replace(
            self,
            meta=meta,
            maps=self.maps[idx],
            targets=self.targets[idx],
            scores=self.scores[idx],
            probs=self.probs[idx],
            top_indices=self.top_indices[idx],
            top_probs=self.top_probs[idx],
            raw_maps=cut(self.raw_maps),
            class_names=cut_list(self.class_names),
            top_names=cut_list(self.top_names),
            images=cut(self.images),
            attributions=cut(self.attributions),
        )

    def to(self, device: torch.device | str) -> Explanation:
        """Move every tensor to ``device``."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            maps=self.maps.to(device),
            targets=self.targets.to(device),
            scores=self.scores.to(device),
            probs=self.probs.to(device),
            top_indices=self.top_indices.to(device),
            top_probs=self.top_probs.to(device),
            raw_maps=mv(self.raw_maps),
            images=mv(self.images),
            attributions=mv(self.attributions),
        )

    def overlay(
        self, i: int = 0, k: int = 0, *, cmap: str = "jet", alpha: float = 0.5
    ) -> Image.Image:
        """The picture of image ``i``, target ``k``.

        A heatmap blended over the image (alone when the image is unknown); for methods whose
        natural display is an image in pixel space (deconvnet, guided backprop,
        ``meta["display"] == "rgb"``), the signed RGB attribution centred on grey; for signed
        maps (:attr:`is_signed`), red for and blue against the target over the image, zero
        transparent (:func:`~convlens.render.overlay.overlay_signed`; ``cmap`` is then used
        only if it is not ``"jet"``, the sequential default).
        """
        from convlens.render.overlay import (
            SIGNED_CMAP,
            overlay_map,
            overlay_signed,
            rgb_attribution,
        )

        alpha = fraction(alpha, "alpha")

        if self.meta.get("display") == "rgb" and self.attributions is not None:
            return rgb_attribution(self.attributions[i, k])

        image = None if self.images is None else self.images[i]
        one = self.maps[i : i + 1, k : k + 1]  # this map only (save() draws each in turn)
        percentile = self.meta.get("display_percentile")
        if self.is_signed:
            signed_cmap = SIGNED_CMAP if cmap == "jet" else cmap
            return overlay_signed(
                _signed(one, percentile)[0, 0], image, cmap=signed_cmap, alpha=alpha
            )
        return overlay_map(_normalized(one, percentile)[0, 0], image, cmap=cmap, alpha=alpha)

    def save(self, path: str | Path, *, cmap: str = "jet", alpha: float = 0.5) -> list[Path]:
        """Save one overlay PNG per image and target.

        Args:
            path: a ``.png`` file when B*K == 1, else a folder that receives
                ``{i}_{method}_{k}.png`` files.
            cmap: matplotlib colour map.
            alpha: opacity of the heatmap over the image.

        Returns:
            The paths written.

        Raises:
            OutputError: a file cannot be written (each is written atomically: whole or not
                at all).
        """
        from convlens.atomic import save_image

        path = Path(path)
        written: list[Path] = []
        single = self.batch_size * self.num_targets == 1
        if not (single and path.suffix.lower() == ".png"):
            path.mkdir(parents=True, exist_ok=True)
        for i in range(self.batch_size):
            for k in range(self.num_targets):
                out = path
                if not (single and path.suffix.lower() == ".png"):
                    out = path / f"{i:03d}_{self.method}_{k}.png"
                save_image(self.overlay(i, k, cmap=cmap, alpha=alpha), out)
                written.append(out)
        return written

    def plot(self, i: int = 0, *, cmap: str = "jet", alpha: float = 0.5) -> Figure:
        """A matplotlib figure: the image and each target's overlay, name and probability."""
        from convlens.render.panels import explanation_figure

        return explanation_figure(self, i, cmap=cmap, alpha=alpha)


def _normalized(maps: torch.Tensor, percentile: float | None) -> torch.Tensor:
    """:meth:`Explanation.normalized` of (B, K, H, W) ``maps``."""
    flat = maps.flatten(2).float()
    if percentile is not None and percentile < 100:
        q = torch.tensor([1 - percentile / 100.0, percentile / 100.0], device=flat.device)
        lo, hi = torch.quantile(flat, q, dim=2, keepdim=True)
        flat = torch.maximum(torch.minimum(flat, hi), lo)
    else:
        lo = flat.min(dim=2, keepdim=True).values
        hi = flat.max(dim=2, keepdim=True).values
    span = (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    out = torch.where(hi > lo, (flat - lo) / span, torch.zeros_like(flat))
    return out.view(maps.shape)


def _signed(maps: torch.Tensor, percentile: float | None) -> torch.Tensor:
    """:meth:`Explanation.signed` of (B, K, H, W) ``maps``."""
    flat = maps.flatten(2).float()
    size = flat.abs()
    top = size.amax(dim=2, keepdim=True)
    scale = top
    if percentile is not None and percentile < 100:
        q = torch.quantile(size, percentile / 100.0, dim=2, keepdim=True)
        scale = torch.where(q > 0, q, top)  # sparse maps: their percentile may be 0
    out = torch.where(scale > 0, flat / scale.clamp_min(1e-30), torch.zeros_like(flat))
    return out.clamp(-1.0, 1.0).view(maps.shape)
