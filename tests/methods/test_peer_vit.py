"""Grad-CAM on a vision transformer against pytorch-grad-cam with its ``reshape_transform``
(issue 16): the same layer gives the same map (Pearson r >= 0.999).

pytorch-grad-cam is a benchmark-environment package, never a convlens dependency: this test runs
in ``.venv-bench`` (``benchmarks/PEERS.md``) and skips elsewhere. The ViT is the plain-torch
``TokenViT`` of the test helpers (timm's layout: ``blocks[-1].norm1``, a class token first),
sized so that the peer's OpenCV resize and convlens' bilinear upsampling see a 6x6 grid.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from convlens import get_method
from tests.helpers.models import TokenViT, seeded
from tests.helpers.paths import REPO


def _reshape_transform(prefix: int, grid: int):  # pytorch-grad-cam's documented ViT recipe
    def transform(t: torch.Tensor) -> torch.Tensor:
        out = t[:, prefix:, :].reshape(t.size(0), grid, grid, t.size(2))
        return out.permute(0, 3, 1, 2)

    return transform


@pytest.mark.parametrize("prefix", [1, 2])
def test_gradcam_on_a_vit_equals_pytorch_grad_cam(
    prefix: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip("pytorch-grad-cam is not installed (benchmark environment only)")
    if importlib.util.find_spec("torchvision") is None:
        # as benchmarks/bench_peers.py does: a stub for the imports the peer never uses here
        monkeypatch.syspath_prepend(str(REPO / "benchmarks" / "_stubs"))
    gradcam_mod = importlib.import_module("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = seeded(TokenViT(size=48, patch=8, dim=16, depth=2, prefix=prefix), dtype=torch.float32)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    ours = get_method("gradcam")(net, x, layer="blocks.1.norm1")
    targets = ours.targets[:, 0].tolist()
    peer = gradcam_mod.GradCAM(
        model=net,
        target_layers=[net.blocks[1].norm1],
        reshape_transform=_reshape_transform(prefix, 6),
    )
    try:
        theirs = peer(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    finally:
        peer.activations_and_grads.release()
    for i in range(x.shape[0]):
        a = ours.maps[i, 0].flatten().double()
        b = torch.as_tensor(theirs[i]).flatten().double()
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert r >= 0.999, f"image {i}: r = {float(r):.5f}"
