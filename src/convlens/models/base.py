"""The model wrapper: a network with its preprocessing and class list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from convlens.models.classes import ClassList
from convlens.models.preprocess import Preprocess

__all__ = ["ConvlensModel", "unwrap"]


@dataclass
class ConvlensModel:
    """A classifier plus what is needed to feed it images and name its outputs.

    Attributes:
        net: the ``nn.Module`` mapping (B, 3, H, W) normalised inputs to (B, num_classes) logits.
        preprocess: how images become inputs (resize, crop, mean, std).
        classes: names (and synsets) of the outputs.
        name: short name shown in reports (``"lite0"``).
    """

    net: nn.Module
    preprocess: Preprocess
    classes: ClassList
    name: str = "model"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def device(self) -> torch.device:
        """Device of the network's first parameter (CPU when it has none)."""
        for p in self.net.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> ConvlensModel:
        """Move the network to ``device`` (in place) and return self."""
        self.net.to(device)
        return self

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Read, validate and preprocess image files into one (B, 3, H, W) batch.

        Raises:
            ImageError: a file is missing, unreadable, corrupt or too small.
        """
        from convlens.images import load_image

        return torch.stack([self.preprocess(load_image(p)) for p in paths])

    def display(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs back to [0, 1] pixels for display."""
        return self.preprocess.denormalize(x.detach())

    @torch.no_grad()
    def predict(self, x: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` classes of each image: ``(indices (B, k), probabilities (B, k))``.

        The network is evaluated in eval mode; its training flags are restored afterwards.
        ``k`` larger than the number of classes gives all of them.

        Raises:
            InputError: ``k`` is not a positive integer, or ``x`` holds NaN or infinite values.
            NonFiniteError: the network's outputs are NaN or infinite for some (finite) images;
                the message names them and ``rows`` lists them (no probabilities are made up
                for them).
        """
        from convlens.hooks import model_state
        from convlens.validate import check_finite_inputs, nonfinite_outputs, positive_int

        k = positive_int(k, "k")
        check_finite_inputs(x)
        with model_state(self.net, eval_mode=True, grads=False):
            logits = self.net(x.to(self.device)).float()
        bad = nonfinite_outputs(logits)
        if bad is not None:
            raise bad
        probs = torch.softmax(logits, dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return top.indices, top.values


def unwrap(model: nn.Module | ConvlensModel) -> tuple[nn.Module, ConvlensModel | None]:
    """Split a model argument into the raw network and the wrapper (if any)."""
    if isinstance(model, ConvlensModel):
        return model.net, model
    if isinstance(model, nn.Module):
        return model, None
    raise TypeError(f"expected a torch.nn.Module or ConvlensModel, got {type(model).__name__}")
