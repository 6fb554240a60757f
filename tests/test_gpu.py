"""The same answers on a CUDA device as on the CPU: every registered method, the metrics, the
synthesis loop, the feature scan and the analysis run. Skipped without CUDA (CI has none); run
with ``pytest -m gpu`` on a machine with a GPU."""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from convlens import get_method, list_methods
from convlens.methods import METHODS
from tests.helpers.models import GapNet, SharedActNet, TinyViT, images, seeded
from tests.helpers.paths import DEV_IMAGES

# CONVLENS_TEST_DEVICE=cpu runs these checks against the CPU itself (to test the tests).
DEVICE = os.environ.get("CONVLENS_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]

LIGHT = {
    "occlusion": {"patch": 4, "stride": 2},
    "smoothgrad": {"samples": 4},
    "vargrad": {"samples": 4},
    "rise": {"masks": 64, "batch_size": 16},
    "intgrad": {"steps": 8},
}
# Methods that draw random numbers: a CUDA generator gives other draws than a CPU one with the
# same seed, so these are checked for determinism on the device instead of equality with CPU.
RANDOM = {"smoothgrad", "vargrad", "rise"}


def _relative_error(ref: torch.Tensor, other: torch.Tensor) -> float:
    """max |ref - other| of each map divided by max |ref| of that map, over all maps."""
    ref, other = ref.cpu().double(), other.cpu().double()
    scale = ref.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return float(((ref - other).abs() / scale).max())


def _cuda_copy(net: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(net).to(DEVICE)


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("arch", [GapNet, SharedActNet])
def test_method_on_cuda_equals_cpu(name: str, arch: type[torch.nn.Module]) -> None:
    if METHODS[name].needs_attention:  # refuses CNNs: the tiny vision transformer instead
        if arch is not GapNet:
            pytest.skip("methods that need attention run on the tiny vision transformer once")
        net = seeded(TinyViT(size=16))
    else:
        net = seeded(arch())
    x = images(b=3, size=16)
    method = get_method(name, **LIGHT.get(name, {}))
    gpu_net = _cuda_copy(net)
    gpu = method(gpu_net, x.to(DEVICE), top_k=2)
    assert torch.isfinite(gpu.maps).all()
    assert next(gpu_net.parameters()).device.type == DEVICE  # left where it was
    if name in RANDOM:
        again = method(gpu_net, x.to(DEVICE), top_k=2)
        torch.testing.assert_close(gpu.maps, again.maps)
        return
    cpu = method(net, x, top_k=2)
    assert torch.equal(gpu.targets.cpu(), cpu.targets.cpu())
    # Maps are float32 (scores are softmaxed in float32), so compare at float32 precision,
    # relative to each map's own scale.
    assert _relative_error(cpu.maps, gpu.maps) < 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        {"fuse": False, "graph": "lean"},
        {"graph": "lean"},
        {"channels_last": True},
        {"graph": "lean", "channels_last": True},
    ],
)
def test_integrated_gradients_settings_on_cuda_equal_cpu(kw: dict[str, object]) -> None:
    """Every graph, layout and fold setting of IG (the default runs in the test above)."""
    from convlens.methods import IntegratedGradients

    net = seeded(GapNet())
    x = images(b=3, size=16)
    ref = IntegratedGradients(steps=6)(net, x, top_k=2)
    got = IntegratedGradients(steps=6, **kw)(_cuda_copy(net), x.to(DEVICE), top_k=2)  # type: ignore[arg-type]
    assert got.meta["fused"] is kw.get("fuse", True)
    assert torch.equal(got.targets.cpu(), ref.targets)
    assert _relative_error(ref.maps, got.maps) < 1e-4


def test_metrics_on_cuda_equal_cpu() -> None:
    from convlens.metrics.faithfulness import average_drop, deletion_insertion

    net = seeded(GapNet())
    x = images(b=2, size=16)
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    targets = torch.tensor([0, 3])
    cpu = deletion_insertion(net, x, maps, targets, steps=8)
    gpu = deletion_insertion(
        _cuda_copy(net), x.to(DEVICE), maps.to(DEVICE), targets.to(DEVICE), steps=8
    )
    for a, b in zip(cpu.__dict__.values(), gpu.__dict__.values(), strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-8)
    drop_cpu = average_drop(net, x, maps, targets)
    drop_gpu = average_drop(_cuda_copy(net), x.to(DEVICE), maps.to(DEVICE), targets.to(DEVICE))
    for a, b in zip(drop_cpu, drop_gpu, strict=True):
        torch.testing.assert_close(torch.as_tensor(b).cpu(), torch.as_tensor(a))


def test_compiled_metrics_and_occlusion_suffix_on_cuda() -> None:
    """torch.compile on the device (explicit compile=True; "auto" leaves GPUs alone): the
    compiled copy and the compiled occlusion suffix give the CPU's answers (or fall back to
    eager execution when compilation fails, which still must give them)."""
    from convlens import Occlusion
    from convlens.accel import compiled as comp
    from convlens.metrics import deletion_insertion

    net = seeded(GapNet(), dtype=torch.float32)
    x = images(b=2, size=16).float()
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 3])
    cpu = deletion_insertion(net, x, maps, targets, steps=8, compile=False)
    dev_net = _cuda_copy(net)
    gpu = deletion_insertion(
        dev_net, x.to(DEVICE), maps.to(DEVICE), targets.to(DEVICE), steps=8, compile=True
    )
    torch.testing.assert_close(gpu.deletion.cpu(), cpu.deletion, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.insertion.cpu(), cpu.insertion, rtol=1e-4, atol=1e-5)
    occ = {"patch": 4, "stride": 2, "mode": "exact", "batch_size": 16}
    ref = Occlusion(**occ, compile=False)(net, x)
    got = Occlusion(**occ, compile=True)(dev_net, x.to(DEVICE))
    assert _relative_error(ref.maps, got.maps) < 1e-3
    entries = [e for d in comp._CACHE.values() for e in d.values()]
    assert entries and all(e[1].compiled is True for e in entries), "ran eagerly: see the log"


def test_sanity_check_on_cuda() -> None:
    from convlens.metrics.sanity import cascading_randomization

    net = seeded(GapNet(), dtype=torch.float32)
    x = images(b=2, size=16).float()
    res = cascading_randomization(_cuda_copy(net), x.to(DEVICE), ["gradcam", "saliency"])
    ref = cascading_randomization(net, x, ["gradcam", "saliency"])
    assert res.steps == ref.steps
    for method, metrics in ref.scores.items():
        for metric, values in metrics.items():
            np.testing.assert_allclose(res.scores[method][metric], values, atol=1e-3)


def test_synthesis_on_cuda() -> None:
    from convlens.synthesis import class_visualization, deep_dream

    net = seeded(GapNet(), dtype=torch.float32).to(DEVICE)
    res = class_visualization(net, [0, 1], steps=8, size=32, progress=False)
    assert torch.isfinite(res.images).all() and res.images.shape[0] == 2
    dream = deep_dream(
        net, torch.rand(1, 3, 32, 32), "conv2", octaves=2, steps_per_octave=3, progress=False
    )
    assert torch.isfinite(dream.image).all()


DEV = pytest.mark.skipif(not (DEV_IMAGES / "labels.csv").exists(), reason="no dev images")


def _dev_paths(n: int) -> list[tuple[str, int]]:
    with open(DEV_IMAGES / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [(str(DEV_IMAGES / r["file"]), int(r["label"])) for r in rows]


@DEV
@pytest.mark.slow
def test_default_model_gradcam_on_cuda_equals_cpu() -> None:
    from convlens import load_model

    cpu_model = load_model("lite0")
    gpu_model = load_model("lite0", device=DEVICE)
    x = cpu_model.load_images([p for p, _ in _dev_paths(4)])
    # cuDNN runs float32 convolutions in TF32 by default on Ampere and later; on an H100 that
    # moved saliency maps by up to 28% of their maximum. Methods switch it off for their call
    # (hooks.full_float32), so the maps match the CPU even with the flags left on.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for name in ("gradcam", "saliency", "guided"):
            method = get_method(name)
            a, b = method(cpu_model, x), method(gpu_model, x.to(DEVICE))
            assert torch.equal(a.targets.cpu(), b.targets.cpu())
            # float32 rounding alone moves single pixels of a gradient map by a few percent
            # (a ReLU6 gate flips): on the CPU, float32 against float64 saliency differs by
            # up to 3.7% of the maximum, 6e-4 on average; TF32 moved it by 28%.
            ref, got = a.maps.double(), b.maps.cpu().double()
            mean = float((ref - got).abs().mean() / ref.abs().mean())
            assert mean < 2e-3 and _relative_error(a.maps, b.maps) < 5e-2, (name, mean)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@DEV
@pytest.mark.slow
def test_analyze_on_cuda(tmp_path: Path) -> None:
    from convlens import load_model
    from convlens.analysis import analyze

    rows = _dev_paths(24)
    data = tmp_path / "labels.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    model = load_model("lite0", device=DEVICE)
    res = analyze(model, data, tmp_path / "run", top_errors=4, batch_size=8, progress=False)
    assert (tmp_path / "run" / "report" / "index.html").exists()
    assert res is not None
