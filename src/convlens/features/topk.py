"""The k strongest activations of every channel of a layer, kept while streaming over a dataset.

Zeiler & Fergus (2014, "Visualizing and Understanding Convolutional Networks", §2 and Fig. 2)
show, for each feature map, its top 9 activations over the validation set, each from a different
image. :class:`RunningTopK` keeps exactly that: per channel, the ``k`` images with the largest
maximum activation seen so far and where in the map that maximum lies. Its memory is
``O(channels * k)`` whatever the number of images.
"""

from __future__ import annotations

import torch

from convlens.errors import InputError

__all__ = ["RunningTopK"]


class RunningTopK:
    """Per channel, the ``k`` largest activations seen so far, one per image.

    Each call of :meth:`update` reduces every image's feature map to its maximum per channel
    (and the position of that maximum), then merges those ``B`` candidates with the ``k`` kept so
    far by :func:`torch.topk`. A channel therefore never lists the same image twice, as in
    Zeiler & Fergus (2014), §2: "the top 9 activations ... across the validation data", each
    a different image.

    Slots not filled yet (fewer than ``k`` images seen) hold value ``-inf`` and image id ``-1``.
    NaN activations are ignored (treated as ``-inf``).

    Attributes:
        values: (C, k) float32, the kept activations, largest first.
        image_ids: (C, k) int64, the id (as given to :meth:`update`) of each kept image.
        ys: (C, k) int64, row of the maximum in the feature map.
        xs: (C, k) int64, column of the maximum in the feature map.
        seen: number of images passed to :meth:`update` so far.

    Example:
        >>> top = RunningTopK(channels=64, k=9)
        >>> for ids, x in batches:                            # doctest: +SKIP
        ...     top.update(layer_output(x), ids)
        >>> top.values[c], top.image_ids[c]                   # doctest: +SKIP
    """

    def __init__(self, channels: int, k: int = 9, device: torch.device | str | None = None) -> None:
        """Start empty.

        Args:
            channels: number of channels ``C`` of the layer.
            k: activations kept per channel.
            device: where the (small) state lives; by default the CPU. :meth:`update` moves its
                reduced inputs there, so keep it on the model's device to avoid transfers.

        Raises:
            InputError: ``channels`` or ``k`` is not positive.
        """
        if channels < 1 or k < 1:
            raise InputError(f"channels and k must be positive, got channels={channels}, k={k}")
        self.channels = int(channels)
        self.k = int(k)
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.values = torch.full((channels, k), float("-inf"), dtype=torch.float32, device=dev)
        self.image_ids = torch.full((channels, k), -1, dtype=torch.long, device=dev)
        self.ys = torch.zeros((channels, k), dtype=torch.long, device=dev)
        self.xs = torch.zeros((channels, k), dtype=torch.long, device=dev)
        self.seen = 0

    @property
    def device(self) -> torch.device:
        """Where the state tensors live."""
        return self.values.device

    def update(self, acts: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Merge one batch of feature maps into the running top-k.

        Args:
            acts: (B, C, h, w) activations of ``B`` images (any float dtype and device).
            image_ids: (B,) integer id of each image (e.g. its index in the list of files).

        Raises:
            InputError: the shapes do not match (``C`` differs from ``channels``, or ``B`` from
                the number of ids).
        """
        if acts.dim() != 4 or acts.shape[1] != self.channels:
            raise InputError(
                f"expected activations of shape (B, {self.channels}, h, w), got {tuple(acts.shape)}"
            )
        ids = torch.as_tensor(image_ids, dtype=torch.long).flatten()
        if ids.numel() != acts.shape[0]:
            raise InputError(
                f"got {ids.numel()} image ids for a batch of {acts.shape[0]} feature maps"
            )
        b, c, _, w = acts.shape
        if b == 0:
            return
        flat = acts.detach().flatten(2)
        if flat.is_floating_point() and bool(torch.isnan(flat).any()):
            flat = torch.nan_to_num(flat, nan=float("-inf"))
        best, where = flat.max(dim=2)  # (B, C)
        dev = self.device
        cand_v = best.to(device=dev, dtype=torch.float32).T  # (C, B)
        where = where.to(dev).T
        cand_id = ids.to(dev).unsqueeze(0).expand(c, b)
        values = torch.cat([self.values, cand_v], dim=1)
        top = values.topk(self.k, dim=1)
        self.values = top.values
        self.image_ids = torch.cat([self.image_ids, cand_id], dim=1).gather(1, top.indices)
        self.ys = torch.cat([self.ys, where // w], dim=1).gather(1, top.indices)
        self.xs = torch.cat([self.xs, where % w], dim=1).gather(1, top.indices)
        self.seen += b

    def valid(self) -> torch.Tensor:
        """(C, k) bool: which slots hold an activation (``False`` until ``k`` images were seen,
        or for images whose maps were all NaN)."""
        return (self.image_ids >= 0) & (self.values > float("-inf"))

    def score(self) -> torch.Tensor:
        """(C,) mean of each channel's kept activations (over the valid slots; ``-inf`` for a
        channel with none). Used to rank channels by how strongly they respond."""
        ok = self.valid()
        total = torch.where(ok, self.values, torch.zeros_like(self.values)).sum(dim=1)
        count = ok.sum(dim=1)
        mean = total / count.clamp_min(1)
        return torch.where(count > 0, mean, torch.full_like(mean, float("-inf")))

    def to(self, device: torch.device | str) -> RunningTopK:
        """Move the state to ``device`` (in place) and return self."""
        self.values = self.values.to(device)
        self.image_ids = self.image_ids.to(device)
        self.ys = self.ys.to(device)
        self.xs = self.xs.to(device)
        return self

    def __repr__(self) -> str:
        return f"RunningTopK(channels={self.channels}, k={self.k}, seen={self.seen})"
