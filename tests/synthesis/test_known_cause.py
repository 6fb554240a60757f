"""Known-cause images (convlens.synthesis.known_cause): seeded, balanced, one cause."""

from __future__ import annotations

import pytest
import torch

from convlens.metrics import boxes_to_masks
from convlens.synthesis.known_cause import SHAPES, known_cause_batch, shape_masks


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    a, b = known_cause_batch(20, seed=3), known_cause_batch(20, seed=3)
    for name in ("images", "labels", "masks", "boxes", "distractor_masks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = known_cause_batch(20, seed=4)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (20, 3, 64, 64) and a.images.dtype == torch.float32
    assert float(a.images.min()) >= 0.0 and float(a.images.max()) <= 1.0


def test_classes_balanced() -> None:
    batch = known_cause_batch(50, seed=1)
    assert torch.bincount(batch.labels, minlength=len(SHAPES)).tolist() == [10] * 5
    batch = known_cause_batch(12, seed=1, num_classes=3)
    assert torch.bincount(batch.labels).tolist() == [4, 4, 4]


def test_masks_match_the_drawn_object() -> None:
    batch = known_cause_batch(30, seed=2)
    sizes = batch.boxes[:, 2] - batch.boxes[:, 0]
    assert torch.equal(sizes, batch.boxes[:, 3] - batch.boxes[:, 1])
    assert bool(((sizes >= 16) & (sizes <= 26)).all())
    # the mask lies in the box, covers a fair part of it, and is painted in one colour
    in_box = boxes_to_masks(batch.boxes, (64, 64))
    assert not bool((batch.masks & ~in_box).any())
    assert bool((batch.masks.sum((1, 2)) >= 0.25 * sizes**2).all())
    for i in range(30):
        pix = batch.images[i][:, batch.masks[i]]
        assert torch.equal(pix, pix[:, :1].expand_as(pix))
    # the mask is the shape of the label, redrawn independently at the box
    x0, y0, x1, _ = batch.boxes.T.float()
    s = x1 - x0
    again = shape_masks(batch.labels, x0 + s / 2, y0 + s / 2, s / 2, 64)
    assert torch.equal(again, batch.masks)


def test_shapes_differ_and_fit_their_square() -> None:
    kinds = torch.arange(len(SHAPES))
    c = torch.full((len(SHAPES),), 16.0)
    masks = shape_masks(kinds, c, c, torch.full((len(SHAPES),), 10.0), 32)
    square = torch.zeros(32, 32, dtype=torch.bool)
    square[6:26, 6:26] = True
    for i, name in enumerate(SHAPES):
        assert bool(masks[i].any()), name
        assert not bool((masks[i] & ~square).any()), name
        for j in range(i):
            assert not torch.equal(masks[i], masks[j]), (name, SHAPES[j])
    assert not bool(masks[SHAPES.index("ring")][16, 16])  # the ring has a hole
    assert bool(masks[SHAPES.index("disc")][16, 16])


def test_object_is_the_only_class_dependent_element() -> None:
    """Same seed, other labels: only the pixels of the objects change; distractors stay put."""
    base = known_cause_batch(40, seed=5)
    other = known_cause_batch(40, seed=5, labels=(base.labels + 1 + torch.arange(40) % 4) % 5)
    assert not torch.equal(base.labels, other.labels)
    assert torch.equal(base.boxes, other.boxes)
    assert torch.equal(base.distractor_masks, other.distractor_masks)
    changed = (base.images != other.images).any(dim=1)
    assert bool(changed.any())
    assert not bool((changed & ~(base.masks | other.masks)).any())
    # distractors never touch the object's box, so they cannot hide or fake it
    assert not bool((base.distractor_masks & boxes_to_masks(base.boxes, (64, 64))).any())


def test_distractors_independent_of_the_class() -> None:
    """Distractors cover about the same area whatever the class of the image."""
    batch = known_cause_batch(500, seed=7, distractors=3)
    dm = batch.distractor_masks.flatten(1).sum(1).float()
    per_class = torch.stack([dm[batch.labels == k].mean() for k in range(5)])
    # mean distractor area per class within 25% of the overall mean
    assert bool(((per_class / dm.mean() - 1).abs() < 0.25).all())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        known_cause_batch(4, num_classes=9)
    with pytest.raises(ValueError, match="labels"):
        known_cause_batch(4, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="fit"):
        known_cause_batch(4, object_size=(20, 70))
