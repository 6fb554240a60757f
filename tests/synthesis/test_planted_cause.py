"""Planted-cause images (convlens.synthesis.planted_cause) and the failure modes ``analyze`` finds
on them: the cue's cluster first with a cue-responsive channel among its top 3; nothing stands
out without the cue (the CI version of benchmarks/bench_planted_cause.py, seed 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.analysis import analyze
from convlens.metrics import boxes_to_masks
from convlens.models import Preprocess, load_model
from convlens.synthesis.known_cause import SHAPES, known_cause_batch
from convlens.synthesis.planted_cause import (
    CONTROL_RATES,
    SIZE,
    TEST_RATES,
    TRAIN_RATES,
    cue_pattern,
    cue_response,
    noisy_labels,
    paste_cue,
    planted_cause_batch,
    train_planted_cause,
    write_image_folder,
)
from convlens.synthesis.tiny_models import TinyCNN
from tests.helpers.paths import REPO

STORED = REPO / "benchmarks" / "planted_cause"
HELD_OUT = 10**9  # the benchmark's held-out seeds: 10**9 + seed


# --- the generator -------------------------------------------------------------------------------


def test_same_seed_same_batch_and_clean_is_the_known_cause_batch() -> None:
    a = planted_cause_batch(40, seed=3, cue_rates=TEST_RATES)
    b = planted_cause_batch(40, seed=3, cue_rates=TEST_RATES)
    for name in ("images", "clean", "labels", "cue", "cue_boxes", "boxes", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, planted_cause_batch(40, seed=4).images)
    base = known_cause_batch(
        40, seed=3, size=SIZE, object_size=(8, 13), distractor_size=(3, 5), num_classes=5
    )
    assert torch.equal(a.clean, base.images) and torch.equal(a.labels, base.labels)
    assert a.images.shape == (40, 3, SIZE, SIZE)
    # the control's images are the clean ones: same labels, same places, no cue
    c = planted_cause_batch(40, seed=3, cue_rates=CONTROL_RATES)
    assert not bool(c.cue.any()) and torch.equal(c.images, a.clean)
    assert torch.equal(c.cue_boxes, a.cue_boxes)


def test_cue_only_inside_its_box_clear_of_the_object() -> None:
    batch = planted_cause_batch(200, seed=5, cue_rates=TEST_RATES)
    inside = boxes_to_masks(batch.cue_boxes, (SIZE, SIZE))
    changed = (batch.images != batch.clean).any(dim=1)
    assert not bool((changed & ~inside).any())
    assert not bool(changed[~batch.cue].any())
    # where it is set, the box holds exactly the checkerboard
    side = int(batch.cue_boxes[0, 2] - batch.cue_boxes[0, 0])
    pattern = cue_pattern(side)
    assert set(pattern.unique().tolist()) == {0.0, 1.0}
    for i in torch.nonzero(batch.cue)[:, 0].tolist():
        x0, y0, x1, y1 = batch.cue_boxes[i].tolist()
        assert torch.equal(batch.images[i, :, y0:y1, x0:x1], pattern)
    assert torch.equal(paste_cue(batch.clean, batch.cue_boxes)[batch.cue], batch.images[batch.cue])
    # never on the object's box
    assert not bool((inside & boxes_to_masks(batch.boxes, (SIZE, SIZE))).any())


def test_cue_rates_per_class() -> None:
    train = planted_cause_batch(1000, seed=1, cue_rates=TRAIN_RATES)
    assert not bool(train.cue[train.labels != 0].any())
    assert 0.8 < float(train.cue[train.labels == 0].float().mean()) <= 1.0
    test = planted_cause_batch(1000, seed=1, cue_rates=TEST_RATES)
    for k in range(len(SHAPES)):
        assert 0.35 < float(test.cue[test.labels == k].float().mean()) < 0.65, k
    with pytest.raises(ValueError, match="cue_rates"):
        planted_cause_batch(4, cue_rates=(0.5, 0.5))
    with pytest.raises(ValueError, match="fit"):
        planted_cause_batch(4, cue_size=30)


def test_cue_response_is_cohens_d() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(30, 3))
    cue = clean.copy()
    cue[:, 1] += 2.0
    d = cue_response(cue, clean)
    assert d[0] == 0.0 and d[2] == 0.0
    pooled = np.sqrt((cue[:, 1].var(ddof=1) + clean[:, 1].var(ddof=1)) / 2)
    assert d[1] == pytest.approx(2.0 / pooled)
    assert cue_response(np.ones((4, 2)), np.ones((4, 2))).tolist() == [0.0, 0.0]


def test_noisy_labels_change_exactly_the_share_asked() -> None:
    labels = torch.arange(100) % 5
    noisy = noisy_labels(labels, 0.1, seed=2)
    assert int((noisy != labels).sum()) == 10
    assert bool(((noisy >= 0) & (noisy < 5)).all())
    assert torch.equal(noisy, noisy_labels(labels, 0.1, seed=2))
    assert not torch.equal(noisy, noisy_labels(labels, 0.1, seed=3))


def test_training_is_seeded_and_the_control_sees_the_same_images() -> None:
    def run(rates: tuple[float, ...]) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        net = TinyCNN(width=4)
        losses = train_planted_cause(net, 2, cue_rates=rates, batch_size=8)
        assert not net.training
        return losses, net.fc.weight.detach().clone()

    (la, wa), (lb, wb) = run(TRAIN_RATES), run(TRAIN_RATES)
    assert la == lb and torch.equal(wa, wb)
    lc, _ = run(CONTROL_RATES)
    assert lc != la  # the cue changes the images, hence the loss
    # batch t is planted_cause_batch(seed * 1_000_003 + t + 1): the same images but the cue
    planted = planted_cause_batch(8, seed=1, cue_rates=TRAIN_RATES)
    control = planted_cause_batch(8, seed=1, cue_rates=CONTROL_RATES)
    assert torch.equal(planted.clean, control.images)


# --- the pipeline finds the cue ------------------------------------------------------------------


def _analyze(tmp: Path, kind: str, images: torch.Tensor, labels: torch.Tensor):  # type: ignore[no-untyped-def]
    weights = STORED / f"tiny_cnn_{kind}_seed0.pt"
    assert weights.exists(), f"{weights} missing: python benchmarks/bench_planted_cause.py --train"
    (tmp / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    names = write_image_folder(images, labels, tmp / "data", SHAPES)
    model = load_model(
        "convlens.synthesis.tiny_models:TinyCNN",
        weights=weights,
        classes=tmp / "classes.txt",
        preprocess=Preprocess(resize=None, crop=SIZE, mean=(0, 0, 0), std=(1, 1, 1)),
    )
    result = analyze(
        model, tmp / "data", tmp / "run", top_errors=0, faithfulness=False, progress=False
    )
    index = {str(tmp / "data" / name): i for i, name in enumerate(names)}
    return model, result, {p.id: index[p.path] for p in result.predictions}


@pytest.fixture(scope="module")
def held_out():  # type: ignore[no-untyped-def]
    return planted_cause_batch(500, seed=HELD_OUT, cue_rates=TEST_RATES)


def test_planted_cue_cluster_first_with_a_cue_channel(tmp_path: Path, held_out) -> None:
    model, result, index = _analyze(tmp_path, "planted", held_out.images, held_out.labels)
    modes = result.failure_modes
    first = modes[0]
    cue = [bool(held_out.cue[index[i]]) for i in first.errors_ids]
    assert sum(cue) > len(cue) / 2, "the first cluster's mistakes are mostly cue-bearing"
    assert first.pairs[0]["pred"] == 0  # pushed towards the class the cue was trained with
    # cue-responsive channels, measured independently: the cue pasted on the clean images
    net = model.net
    with torch.no_grad():
        on = net.features(paste_cue(held_out.clean, held_out.cue_boxes)).mean(dim=(2, 3))
        off = net.features(held_out.clean).mean(dim=(2, 3))
    d = cue_response(on.numpy(), off.numpy())
    top = set(np.argsort(-d)[:3].tolist())
    assert {c["channel"] for c in first.push_channels[:3]} & top
    # the decomposition behind the channels is the model's own margin
    assert first.margin > 0


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_no_cue_no_cluster_stands_out(tmp_path: Path, held_out, noise: float) -> None:
    labels = noisy_labels(held_out.labels, noise, seed=HELD_OUT) if noise else held_out.labels
    _, result, _ = _analyze(tmp_path, "control", held_out.clean, labels)
    wrong = [p for p in result.predictions if p.correct is False]
    if noise:
        assert len(wrong) >= 40  # mistakes to cluster, as many as the cue makes
    assert not any(m.stands_out for m in result.failure_modes), [
        (m.errors, m.size, round(m.z, 1)) for m in result.failure_modes
    ]
