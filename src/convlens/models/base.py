"""The model wrapper: a network with its preprocessing and class list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convlens.accel.settings import Acceleration
from convlens.errors import ModelLoadError
from convlens.models.classes import ClassList
from convlens.models.preprocess import Preprocess

__all__ = ["ConvlensModel", "check_class_count", "count_outputs", "unwrap"]


def count_outputs(net: nn.Module, crop: int) -> int | None:
    """How many classes ``net`` scores: one forward pass of a black ``crop`` x ``crop`` image.

    The pass runs without gradients and in eval mode; the network's training flags are restored
    afterwards.

    Args:
        net: the classifier.
        crop: input height and width (the preprocessing's crop).

    Returns:
        The size of the output's class dimension, or ``None`` when the output is not a
        ``(batch, classes)`` tensor (nothing to check a class list against).

    Raises:
        ModelLoadError: the network fails on an input of that size.
    """
    from convlens.hooks.state import model_state

    param = next((p for p in net.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    try:
        with model_state(net, eval_mode=True, grads=False), torch.no_grad():
            out = net(torch.zeros(1, 3, crop, crop, device=device, dtype=dtype))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise ModelLoadError(
            f"the model fails on a 3x{crop}x{crop} input ({reason}); give the input size it "
            "expects (--size, or Preprocess(crop=...))"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        return None
    return int(out.shape[1])


def check_class_count(classes: ClassList, outputs: int) -> None:
    """Check that a class list names each of a model's ``outputs`` classes, no more, no fewer.

    Raises:
        ModelLoadError: the counts differ (the message names the class list's file).
    """
    if len(classes) == outputs:
        return
    where = f"class list '{classes.source}'" if classes.source else "the class list"
    raise ModelLoadError(
        f"{where} has {len(classes)} names but the model has {outputs} outputs; give one name "
        "per output, in output order"
    )


@dataclass
class ConvlensModel:
    """A classifier plus what is needed to feed it images and name its outputs.

    Attributes:
        net: the ``nn.Module`` mapping (B, 3, H, W) normalised inputs to (B, num_classes) logits.
        preprocess: how images become inputs (resize, crop, mean, std).
        classes: names (and synsets) of the outputs.
        name: short name shown in reports (``"lite0"``).
        accel: which accelerators method calls on this model use (the default: every one
            that is exact; ``Acceleration.plain()``: none); a method call's ``accel=``
            argument overrides it (:class:`convlens.accel.Acceleration`).
    """

    net: nn.Module
    preprocess: Preprocess
    classes: ClassList
    name: str = "model"
    accel: Acceleration = field(default_factory=Acceleration)

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
        from convlens.hooks.state import model_state
        from convlens.validate import check_finite_inputs, nonfinite_outputs, positive_int

        k = positive_int(k, "k")
        check_finite_inputs(x)
        with model_state(self.net, eval_mode=True, grads=False):
            logits = self.net(x.to(self.device)).float()
        bad = nonfinite_outputs(logits)
        if bad is not None:
            raise bad
        check_class_count(self.classes, logits.shape[1])
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
