"""Tiny known-cause classifiers (convlens.synthesis.tiny_models) and their stored weights."""

from __future__ import annotations

import pytest
import torch

import convlens
from convlens.metrics import baseline_map, boxes_to_masks, pointing_game
from convlens.synthesis.known_cause import known_cause_batch
from convlens.synthesis.tiny_models import (
    TinyCNN,
    TinyViT,
    tiny_model,
    train_known_cause,
    train_steps,
)
from tests.helpers.paths import REPO

CHECKPOINTS = REPO / "benchmarks" / "known_cause"


def _stored(arch: str) -> torch.nn.Module:
    path = CHECKPOINTS / f"tiny_{arch}.pt"
    assert path.exists(), f"{path} missing: python benchmarks/bench_known_cause.py --train"
    net = tiny_model(arch)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_shapes_and_timm_layout(arch: str) -> None:
    net = tiny_model(arch).eval()
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    if arch == "vit":
        names = dict(net.named_modules())
        for name in ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.3.norm1", "norm", "head"):
            assert name in names, name
        assert net.patch_embed.grid_size == (8, 8)


def test_vit_attention_equals_multihead_attention() -> None:
    """The hand-written attention equals torch's nn.MultiheadAttention with the same weights."""
    torch.manual_seed(0)
    vit = TinyViT(dim=16, num_heads=4, depth=1).eval()
    attn = vit.blocks[0].attn
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 7, 16)
    expected, _ = mha(x, x, x, need_weights=False)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_training_is_seeded() -> None:
    def run() -> tuple[list[float], torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        net = TinyCNN(width=4)
        start = net.fc.weight.detach().clone()
        losses = train_known_cause(net, 3, batch_size=8, warmup=1)
        assert not net.training
        return losses, start, net.fc.weight.detach().clone()

    (la, sa, wa), (lb, _, wb) = run(), run()
    assert la == lb and torch.equal(wa, wb)
    assert not torch.equal(sa, wa)


def test_train_steps_leaves_eval_mode_without_gradients() -> None:
    """After training, and after a step that raises, the net is in eval mode with no .grad."""
    torch.manual_seed(0)
    net = TinyCNN(width=4)
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    train_steps(net, 2, lambda t: (images, labels), warmup=1)
    assert not net.training
    assert all(p.grad is None for p in net.parameters())

    def failing(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t == 1:
            raise RuntimeError("batch failed")
        return images, labels

    with pytest.raises(RuntimeError, match="batch failed"):
        train_steps(net, 3, failing, warmup=1)
    assert not net.training
    assert all(p.grad is None for p in net.parameters())


def test_stored_cnn_accurate_and_gradcam_points_at_the_object() -> None:
    net = _stored("cnn")
    batch = known_cause_batch(48, seed=123_456_789)  # seeds never used in training
    with torch.no_grad():
        acc = (net(batch.images).argmax(1) == batch.labels).float().mean()
    assert float(acc) >= 0.95
    exp = convlens.get_method("gradcam")(net, batch.images, batch.labels)
    boxes = boxes_to_masks(batch.boxes, (64, 64))
    assert float(pointing_game(exp.maps[:, 0], boxes, tolerance=0).float().mean()) >= 0.9
    # a map that knows nothing of the model does not
    noise = baseline_map("random", 48, (64, 64), seed=0)
    assert float(pointing_game(noise, boxes, tolerance=0).float().mean()) < 0.5


def test_stored_vit_accurate() -> None:
    net = _stored("vit")
    batch = known_cause_batch(48, seed=123_456_789)
    with torch.no_grad():
        acc = (net(batch.images).argmax(1) == batch.labels).float().mean()
    assert float(acc) >= 0.9
