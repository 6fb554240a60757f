"""Attention rollout and gradient-weighted attention relevance against independent computations:
attention matrices recomputed by hand from each block's weights (a forward pass written here,
checked against the model's logits), rollout by a direct loop over images and blocks, relevance
by autograd on those hand-made matrices; explicit attention equal to the fused path; CNNs
refused in one line; the model left as found; multiple targets; the command line."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from convlens import UnsupportedModelError, get_method, list_methods
from convlens.hooks.attention import explicit_attention
from convlens.methods import METHODS, AttentionRelevance, AttentionRollout
from tests.helpers import zoo
from tests.helpers.cli import exit_code
from tests.helpers.models import GapNet, TinyVGG, TinyViT, images, seeded
from tests.helpers.paths import REPO

# ------------------------------------------------------------------ hand-written forward passes

Forward = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


def _attend(
    t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of tokens ``t`` (B, N, C) with a packed [q; k; v] projection, head by
    head: ``(attention (B, heads, N, N), concatenated head outputs (B, N, C))``."""
    c = t.shape[-1]
    d = c // heads
    qkv = t @ w.T + (0 if b is None else b)
    scores = []
    for h in range(heads):
        q = qkv[..., h * d : (h + 1) * d]
        k = qkv[..., c + h * d : c + (h + 1) * d]
        scores.append(torch.einsum("bnd,bmd->bnm", q, k) / math.sqrt(d))
    attn = torch.softmax(torch.stack(scores, dim=1), dim=-1)  # the tensor the outputs use
    outs = []
    for h in range(heads):
        v = qkv[..., 2 * c + h * d : 2 * c + (h + 1) * d]
        outs.append(torch.einsum("bnm,bmd->bnd", attn[:, h], v))
    return attn, torch.cat(outs, dim=-1)


def _ln(t: torch.Tensor, m: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(t, m.normalized_shape, m.weight, m.bias, m.eps)


def tiny_vit_by_hand(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    t = F.conv2d(x, net.conv_proj.weight, net.conv_proj.bias, stride=net.patch_size)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([net.class_token.expand(x.shape[0], -1, -1), t], 1) + net.pos_embedding
    attns = []
    for blk in net.blocks:
        mha = blk.self_attention
        a, o = _attend(_ln(t, blk.ln_1), mha.in_proj_weight, mha.in_proj_bias, mha.num_heads)
        attns.append(a)
        t = t + o @ mha.out_proj.weight.T + mha.out_proj.bias
        h = F.gelu(_ln(t, blk.ln_2) @ blk.mlp[0].weight.T + blk.mlp[0].bias)
        t = t + h @ blk.mlp[2].weight.T + blk.mlp[2].bias
    return _ln(t, net.ln)[:, 0] @ net.head.weight.T + net.head.bias, attns


def timm_by_hand(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pe = net.patch_embed.proj
    t = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    prefix = [net.cls_token.expand(x.shape[0], -1, -1)]
    for extra in ("dist_token", "reg_token"):  # DeiT's distillation token, register tokens
        if getattr(net, extra, None) is not None:
            prefix.append(getattr(net, extra).expand(x.shape[0], -1, -1))
    t = torch.cat([*prefix, t], 1) + net.pos_embed
    attns = []
    for blk in net.blocks:
        qkv = blk.attn.qkv
        a, o = _attend(_ln(t, blk.norm1), qkv.weight, qkv.bias, blk.attn.num_heads)
        attns.append(a)
        t = t + o @ blk.attn.proj.weight.T + blk.attn.proj.bias
        h = F.gelu(_ln(t, blk.norm2) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        t = t + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    t = _ln(t, net.norm)
    logits = t[:, 0] @ net.head.weight.T + net.head.bias
    if getattr(net, "head_dist", None) is not None:  # DeiT distilled: the two heads' mean
        logits = (logits + t[:, 1] @ net.head_dist.weight.T + net.head_dist.bias) / 2
    return logits, attns


def torchvision_by_hand(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    t = F.conv2d(x, net.conv_proj.weight, net.conv_proj.bias, stride=net.patch_size)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([net.class_token.expand(x.shape[0], -1, -1), t], 1)
    t = t + net.encoder.pos_embedding
    attns = []
    for blk in net.encoder.layers:
        mha = blk.self_attention
        a, o = _attend(_ln(t, blk.ln_1), mha.in_proj_weight, mha.in_proj_bias, mha.num_heads)
        attns.append(a)
        t = t + o @ mha.out_proj.weight.T + mha.out_proj.bias
        h = F.gelu(_ln(t, blk.ln_2) @ blk.mlp[0].weight.T + blk.mlp[0].bias)
        t = t + h @ blk.mlp[3].weight.T + blk.mlp[3].bias
    head = net.heads.head
    return _ln(t, net.encoder.ln)[:, 0] @ head.weight.T + head.bias, attns


# ------------------------------------------------------------------------------------ oracles


def rollout_by_loop(
    attns: list[torch.Tensor], fusion: str = "mean", discard: float = 0.0
) -> torch.Tensor:
    """Row 0 of the rollout, image by image, block by block."""
    rows = []
    for i in range(attns[0].shape[0]):
        n = attns[0].shape[-1]
        flow = torch.eye(n, dtype=torch.float64)
        for a in attns:
            heads = [a[i, h].double() for h in range(a.shape[1])]
            if fusion == "mean":
                fused = sum(heads) / len(heads)
            else:
                pick = torch.maximum if fusion == "max" else torch.minimum
                fused = heads[0]
                for h in heads[1:]:
                    fused = pick(fused, h)
            fused = fused.clone()
            order = sorted(
                (float(fused[r, c]), r, c) for r in range(n) for c in range(n) if (r, c) != (0, 0)
            )
            for _, r, c in order[: int(discard * n * n)]:
                fused[r, c] = 0.0
            step = torch.zeros(n, n, dtype=torch.float64)
            for r in range(n):
                row = [0.5 * float(fused[r, c]) + (0.5 if r == c else 0.0) for c in range(n)]
                total = sum(row)
                for c in range(n):
                    step[r, c] = row[c] / total
            flow = step @ flow
        rows.append(flow[0])
    return torch.stack(rows)


def relevance_by_autograd(
    by_hand: Forward, net: nn.Module, x: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Row 0 of Chefer's relevance from the hand-made attention matrices and their gradients
    (one backward pass per image, so no batching is shared with the library)."""
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits, attns = by_hand(net, xi)
        grads = torch.autograd.grad(logits[0, int(target[i])], attns)
        n = attns[0].shape[-1]
        rel = torch.eye(n, dtype=torch.float64)
        for a, g in zip(attns, grads, strict=True):
            w = (a[0] * g[0]).clamp(min=0).sum(dim=0) / a.shape[1]
            rel = rel + w.detach() @ rel
        rows.append(rel[0])
    return torch.stack(rows)


# ------------------------------------------------------------------------------------- models


def tiny_vit() -> nn.Module:
    return seeded(TinyViT(), seed=4)


def _init(net: nn.Module) -> nn.Module:
    """Random weights (std 0.2; torchvision's head starts at zero) in float64, eval mode."""
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p, std=0.2)
    return net.double().eval()


def timm_vit(**kw: object) -> nn.Module:
    timm = pytest.importorskip("timm")
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    args.update(kw)
    vt = timm.models.vision_transformer
    return _init(vt.VisionTransformer(num_classes=5, **args))


def torchvision_vit() -> nn.Module:
    return _init(zoo.torchvision_vit())


MODELS: dict[str, tuple[Callable[[], nn.Module], Forward, int]] = {
    "tiny": (tiny_vit, tiny_vit_by_hand, 12),
    "timm": (timm_vit, timm_by_hand, 32),
    "torchvision": (torchvision_vit, torchvision_by_hand, 32),
}


@pytest.fixture(params=list(MODELS))
def vit(request: pytest.FixtureRequest) -> tuple[nn.Module, Forward, torch.Tensor]:
    build, by_hand, size = MODELS[request.param]
    return build(), by_hand, images(3, size=size, seed=1)


def _grid(x: torch.Tensor, n: int) -> tuple[int, int]:
    g = math.isqrt(n - 1)
    assert g * g == n - 1
    return g, g


# -------------------------------------------------------------------------------------- tests


def test_the_hand_made_forward_pass_is_the_models(vit) -> None:
    net, by_hand, x = vit
    with torch.no_grad():
        logits, attns = by_hand(net, x)
        torch.testing.assert_close(logits, net(x), atol=1e-10, rtol=1e-10)
    assert len(attns) == 2 and attns[0].shape[1] == 2


def test_explicit_attention_keeps_the_logits_and_records_every_block(vit) -> None:
    net, by_hand, x = vit
    with torch.no_grad():
        plain = net(x)
        with explicit_attention(net) as record:
            explicit = net(x)
        _, attns = by_hand(net, x)
    torch.testing.assert_close(explicit, plain, atol=1e-10, rtol=1e-10)
    assert len(record.weights) == len(attns)
    for got, want in zip(record.weights, attns, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_timm_fused_attention_equals_the_explicit_path_and_the_flag_is_restored() -> None:
    net = timm_vit()
    attn = [b.attn for b in net.blocks]
    for a in attn:
        a.fused_attn = True  # F.scaled_dot_product_attention
    x = images(2, size=32)
    with torch.no_grad():
        fused = net(x)
        with explicit_attention(net) as record:
            assert [a.fused_attn for a in attn] == [False, False]
            explicit = net(x)
    assert [a.fused_attn for a in attn] == [True, True]
    assert len(record.weights) == 2
    torch.testing.assert_close(explicit, fused, atol=1e-10, rtol=1e-10)
    for name in ("rollout", "chefer"):
        get_method(name)(net, x)
        assert [a.fused_attn for a in attn] == [True, True]
        assert not any(a.attn_drop._forward_hooks for a in attn)


@pytest.mark.parametrize(
    ("fusion", "discard"), [("mean", 0.0), ("max", 0.0), ("min", 0.3), ("mean", 0.6)]
)
def test_rollout_equals_a_direct_loop(vit, fusion: str, discard: float) -> None:
    net, by_hand, x = vit
    with torch.no_grad():
        _, attns = by_hand(net, x)
    want = rollout_by_loop(attns, fusion, discard)
    exp = AttentionRollout(head_fusion=fusion, discard_ratio=discard)(net, x, top_k=2)
    gh, gw = _grid(x, attns[0].shape[-1])
    assert exp.raw_maps is not None and exp.raw_maps.shape == (3, 2, gh, gw)
    torch.testing.assert_close(
        exp.raw_maps[:, 0].double(), want[:, 1:].reshape(3, gh, gw).float().double()
    )
    torch.testing.assert_close(exp.raw_maps[:, 1], exp.raw_maps[:, 0], atol=0, rtol=0)
    assert exp.meta["class_agnostic"] is True
    assert exp.meta["head_fusion"] == fusion and exp.meta["discard_ratio"] == discard


def test_relevance_equals_autograd_on_hand_made_attention_for_every_target(vit) -> None:
    net, by_hand, x = vit
    exp = AttentionRelevance()(net, x, top_k=3)
    assert exp.raw_maps is not None
    gh, gw = exp.raw_maps.shape[-2:]
    for k in range(3):
        want = relevance_by_autograd(by_hand, net, x, exp.targets[:, k])
        torch.testing.assert_close(
            exp.raw_maps[:, k].double(), want[:, 1:].reshape(3, gh, gw).float().double()
        )
    assert not torch.allclose(exp.raw_maps[:, 0], exp.raw_maps[:, 1])  # class-specific
    assert "class_agnostic" not in exp.meta


def test_relevance_for_a_given_target_equals_its_column_of_top_k() -> None:
    net, x = tiny_vit(), images(2)
    every = AttentionRelevance()(net, x, top_k=5)
    third = AttentionRelevance()(net, x, target=every.targets[:, 2:3])
    torch.testing.assert_close(third.maps[:, 0], every.maps[:, 2], atol=1e-6, rtol=1e-5)


def deit_distilled() -> nn.Module:
    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled

    net = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    )
    return _init(net)


@pytest.mark.parametrize("build", ["registers", "distilled"])
def test_timm_register_and_distillation_tokens_are_skipped(build: str) -> None:
    net = timm_vit(reg_tokens=2) if build == "registers" else deit_distilled()
    prefix = 3 if build == "registers" else 2
    assert net.num_prefix_tokens == prefix
    x = images(2, size=32)
    with torch.no_grad():
        logits, attns = timm_by_hand(net, x)
        torch.testing.assert_close(logits, net(x), atol=1e-10, rtol=1e-10)
    exp = get_method("rollout")(net, x)
    assert exp.raw_maps is not None and exp.raw_maps.shape == (2, 1, 4, 4)
    want = rollout_by_loop(attns)[:, prefix:].reshape(2, 4, 4)
    torch.testing.assert_close(exp.raw_maps[:, 0].double(), want.float().double())
    rel = get_method("chefer")(net, x)
    want = relevance_by_autograd(timm_by_hand, net, x, rel.targets[:, 0])
    assert rel.raw_maps is not None
    torch.testing.assert_close(
        rel.raw_maps[:, 0].double(), want[:, prefix:].reshape(2, 4, 4).float().double()
    )


def test_a_wrapped_vit_is_found_inside_its_wrapper() -> None:
    vit = tiny_vit()
    net = nn.Sequential(nn.Identity(), vit)
    x = images(2)
    for name in ("rollout", "chefer"):
        inner = get_method(name)(vit, x)
        outer = get_method(name)(net, x)
        torch.testing.assert_close(outer.maps, inner.maps, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["rollout", "chefer"])
@pytest.mark.parametrize("cnn", [GapNet, TinyVGG])
def test_cnns_are_refused_in_one_line_naming_what_is_supported(name: str, cnn: type) -> None:
    net = seeded(cnn())
    with pytest.raises(UnsupportedModelError) as info:
        get_method(name)(net, images(1, size=16))
    text = str(info.value)
    assert "\n" not in text and "timm" in text and "torchvision" in text
    assert cnn.__name__ in text


@pytest.mark.parametrize("arch", ["swin", "convnext"])
def test_timm_swin_and_convnext_are_refused_in_one_line(arch: str) -> None:
    torch.manual_seed(0)
    net = zoo.timm_swin() if arch == "swin" else zoo.timm_convnext()
    for name in ("rollout", "chefer"):
        with pytest.raises(UnsupportedModelError, match="no attention module") as info:
            get_method(name)(net.eval(), images(1, size=32).float())
        assert "\n" not in str(info.value)


def test_a_timm_model_without_class_token_is_refused() -> None:
    net = timm_vit(class_token=False, global_pool="avg")
    with pytest.raises(UnsupportedModelError, match="no class token"):
        get_method("rollout")(net, images(1, size=32))


def test_the_methods_declare_that_they_need_attention() -> None:
    assert {n for n in list_methods() if METHODS[n].needs_attention} == {"rollout", "chefer"}
    assert not METHODS["gradcam"].needs_attention


def _snapshot(net: nn.Module) -> list[object]:
    return [
        [m.training for m in net.modules()],
        [sorted(m.__dict__) for m in net.modules()],
        [getattr(m, "fused_attn", None) for m in net.modules()],
        [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()],
        [p.requires_grad for p in net.parameters()],
    ]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", ["rollout", "chefer"])
def test_the_model_is_left_as_found_after_success_and_after_an_error(vit, name: str) -> None:
    net, _, x = vit
    net.train()
    before = _snapshot(net)
    get_method(name)(net, x)
    assert _snapshot(net) == before
    mlps = [m for n, m in net.named_modules() if n.endswith("mlp")]
    handle = mlps[-1].register_forward_hook(lambda *_: (_ for _ in ()).throw(Boom("injected")))
    try:
        with pytest.raises(Boom):
            get_method(name)(net, x)
    finally:
        handle.remove()
    assert _snapshot(net) == before


def test_a_forward_set_on_the_instance_by_the_user_is_put_back() -> None:
    net = tiny_vit()
    mha = net.blocks[0].self_attention
    own = mha.forward
    mha.forward = own  # type: ignore[method-assign]
    with explicit_attention(net):
        assert mha.forward is not own
    assert mha.__dict__["forward"] is own
    assert "forward" not in net.blocks[1].self_attention.__dict__


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(head_fusion="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"discard_ratio must be a number in \[0, 1\)"):
        AttentionRollout(discard_ratio=1.0)


# ---------------------------------------------------------------------------- command line


def test_methods_lists_both_with_their_papers(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["methods"]) == 0
    text = capsys.readouterr().out
    assert "rollout" in text and "Abnar & Zuidema 2020" in text
    assert "chefer" in text and "Chefer et al. 2021" in text


USER_VIT = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tests.helpers.models import TinyViT, seeded

def build():
    return seeded(TinyViT(size=32, patch_size=8))
"""

USER_TIMM = """
import torch
from timm.models.vision_transformer import VisionTransformer

def build():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=3)
"""


@pytest.mark.parametrize("source", ["tiny", "timm"])
def test_explain_runs_both_on_a_user_vit(tmp_path: Path, source: str) -> None:
    if source == "timm":
        pytest.importorskip("timm")
    (tmp_path / "vit.py").write_text(USER_VIT if source == "tiny" else USER_TIMM)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'vit.py'}:build"]
    args += ["--size", "32", "--methods", "rollout,chefer", "--out", str(out)]
    assert exit_code(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"a_rollout.png", "a_chefer.png", "a_panel.png"} <= names


def test_explain_refuses_a_cnn_in_one_line(tmp_path: Path, capsys) -> None:
    from tests.helpers.models import tiny_net_source

    (tmp_path / "net.py").write_text(tiny_net_source())
    Image.new("RGB", (40, 40), (90, 30, 200)).save(tmp_path / "a.png")
    args = ["explain", str(tmp_path / "a.png"), "--model", f"{tmp_path / 'net.py'}:build"]
    args += ["--size", "32", "--methods", "chefer", "--out", str(tmp_path / "out")]
    assert exit_code(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no attention module" in err and len(err.splitlines()) == 1


def test_a_module_laid_out_like_timms_attention_is_read_without_timm() -> None:
    """The known-cause ViT (convlens.synthesis) writes timm's Attention out by hand (``qkv``,
    ``num_heads``, ``fused_attn``, ``attn_drop``): its matrices are read at ``attn_drop`` and
    rollout equals the loop over the matrices computed from the blocks' own weights."""
    from convlens.synthesis.tiny_models import tiny_model

    net = seeded(tiny_model("vit"), dtype=torch.float64)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    attns = []
    with torch.no_grad():
        for block in net.blocks:
            m = block.attn
            handle = block.norm1.register_forward_hook(
                lambda _m, _a, out, m=m: attns.append(_softmax_attention(m, out))
            )
            try:
                net(x)
            finally:
                handle.remove()
    exp = AttentionRollout()(net, x)
    want = rollout_by_loop(attns, "mean", 0.0)
    assert exp.meta["attention_layers"] == [f"blocks.{i}.attn" for i in range(len(net.blocks))]
    assert exp.raw_maps is not None
    gh, gw = exp.raw_maps.shape[-2:]
    torch.testing.assert_close(exp.raw_maps[:, 0].double(), want[:, 1:].reshape(2, gh, gw))


def _softmax_attention(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from a timm-layout module's own ``qkv`` weights."""
    b, n, c = y.shape
    q, k, _ = m.qkv(y).reshape(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-2, -1) / (c // m.num_heads) ** 0.5, dim=-1)


def test_windowed_attention_is_not_taken_for_global_attention() -> None:
    from convlens.hooks.attention import attention_modules

    class Attention(nn.Module):  # written like timm's
        def __init__(self, window: bool = False) -> None:
            super().__init__()
            self.qkv, self.num_heads, self.fused_attn = nn.Linear(4, 12), 2, False
            self.attn_drop = nn.Dropout(0.0)
            if window:
                self.window_size = (2, 2)

    class XCA(Attention):  # the same layout, but channel attention: another class name
        pass

    net = nn.Sequential(Attention(window=True), Attention(), XCA())
    assert [name for name, _ in attention_modules(net)] == ["1"]


def test_registers_without_a_class_token_are_refused() -> None:
    """timm ViTs with register tokens and no class token (``class_token=False``,
    ``reg_tokens=1``, average pooling) have a prefix whose first row is a register: refused,
    not read as the class token."""
    timm = pytest.importorskip("timm")
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
        class_token=False,
        reg_tokens=1,
        global_pool="avg",
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    for method in (AttentionRollout(), AttentionRelevance()):
        with pytest.raises(UnsupportedModelError, match="no class token"):
            method(net, x)
