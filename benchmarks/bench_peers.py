"""Benchmark convlens against its peers (pytorch-grad-cam, Captum), side by side in one process.

For each method pair both libraries explain the same function (the default model, EfficientNet-
Lite0), the same real images, the same target (the top-1 class) and, for the CAM family, the
same layer (the head activation, 1280x7x7). Reported per pair: seconds per image (median of
``--repeats`` interleaved calls after one warm-up call each), cost in units of one plain batched
forward pass of the same batch (timed alongside), images sent through the network (counted by
a forward hook during the warm-up call), agreement of the maps (Pearson r and max-abs-diff of
min-max-normalised maps), and peak memory where measured (each such measurement runs in a fresh
subprocess whose RSS high-water mark ``VmHWM`` is reset after setup and read after the call).

Pairs:

- ``gradcam``: convlens ``GradCAM`` vs ``pytorch_grad_cam.GradCAM``.
- ``gradcam++``: convlens ``GradCAMPlusPlus`` vs ``pytorch_grad_cam.GradCAMPlusPlus``.
- ``scorecam``: convlens ``ScoreCAM(score="logit", channel_softmax=True, align_corners=True)``
  (pytorch-grad-cam's variant, same masked inputs and weights) vs ``pytorch_grad_cam.ScoreCAM``
  at the same batch size; convlens at its default batch size is timed as an extra row.
- ``ablationcam``: convlens ``AblationCAM()`` (closed form on GAP + linear) vs
  ``pytorch_grad_cam.AblationCAM`` (all channels ablated).
- ``intgrad``: convlens ``IntegratedGradients`` vs ``captum.attr.IntegratedGradients``, same
  steps, Gauss-Legendre on both sides, same internal batch; Captum with its default internal
  batch (all steps at once) as an extra row, and peak memory of all three.
- ``smoothgrad``: convlens ``SmoothGrad(Saliency)`` vs Captum ``NoiseTunnel(Saliency)``, same
  samples, same absolute noise sigma, same noisy copies per pass.
- ``occlusion``: convlens ``Occlusion(patch=16, stride=8, fill=0, score="prob")`` vs Captum
  ``Occlusion`` on softmax outputs (same windows), best of several ``perturbations_per_eval``.

pytorch-grad-cam imports torchvision in image helpers that these methods never call; when no
working torchvision is installed, the stub in ``benchmarks/_stubs`` is put on ``sys.path``
(only here). Build the environment as described in ``benchmarks/PEERS.md``.

Example:
    .venv-bench/bin/python benchmarks/bench_peers.py
    .venv-bench/bin/python benchmarks/bench_peers.py --pairs gradcam intgrad --no-write
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars

import numpy as np
import torch
from torch import nn

import convlens
from convlens.hooks import full_float32, layer_capture
from convlens.methods import AblationCAM, IntegratedGradients, ScoreCAM
from convlens.models.base import ConvlensModel

import _common as common

HERE = Path(__file__).resolve().parent
STUBS = HERE / "_stubs"
DEFAULT_OUT = HERE / "RESULTS.md"
RESULTS_TITLE = "# convlens benchmark results"
PAIRS = ("gradcam", "gradcam++", "scorecam", "ablationcam", "intgrad", "smoothgrad", "occlusion")
MB = 2**20
META_KEYS = (
    "forward_passes",
    "points_per_pass",
    "perturbations_per_batch",
    "closed_form",
    "suffix_passes",
    "graph",
    "fused",
)

# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def import_peers() -> dict[str, str]:
    """Import Captum and pytorch-grad-cam (with the torchvision stub if needed); versions."""
    stub = False
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError as err:  # missing: the stub; a broken install: fail loudly
        if err.name != "torchvision":
            raise
        sys.path.insert(0, str(STUBS))
        stub = True
    import captum  # noqa: F401
    import pytorch_grad_cam  # noqa: F401

    return {
        "python": platform.python_version(),
        "convlens commit": common.git_commit(),
        "torch": torch.__version__,
        "convlens": convlens.__version__,
        "captum": common.dist_version("captum"),
        "grad-cam": common.dist_version("grad-cam"),
        "torchvision": "stub (benchmarks/_stubs)" if stub else common.dist_version("torchvision"),
        "numpy": np.__version__,
        "opencv": common.dist_version("opencv-python-headless"),
    }


class SplitHead(nn.Module):
    """EfficientNet-Lite's forward with the head activation as a module of its own.

    The network uses one ``ReLU6`` module (``_swish``) twice: after the stem and after the head
    convolution. pytorch-grad-cam hooks modules, so it would capture both calls; this wrapper
    runs exactly the same computation (copied from ``efficientnet_lite_pytorch``'s
    ``extract_features`` and ``forward``) with a separate ``swish_head`` for the second call.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if net._global_params.local_pooling:
            raise ValueError("local pooling variant not supported")
        self.net = net
        self.swish_head = type(net._swish)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for idx, block in enumerate(n._blocks):
            rate = n._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(n._blocks)
            x = block(x, drop_connect_rate=rate)
        x = self.swish_head(n._bn1(n._conv_head(x)))
        x = n._avg_pooling(x).flatten(1)
        x = n._dropout(x)
        return n._fc(x)


class SoftmaxNet(nn.Module):
    """The network followed by a softmax (Captum's occlusion then scores probabilities)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The model, its peer-facing wrapper and the images of the run."""

    model: ConvlensModel
    net: nn.Module
    head: SplitHead
    x: torch.Tensor  # (N, 3, H, W), N = the largest batch any pair uses
    targets: torch.Tensor  # (N,) top-1 classes
    files: list[str]

    def batch(self, b: int) -> tuple[torch.Tensor, list[int]]:
        """The first ``b`` images and their targets."""
        return self.x[:b].clone(), [int(t) for t in self.targets[:b]]


def clear_grads(net: nn.Module) -> None:
    """Drop parameter gradients left behind by a peer's ``loss.backward()``."""
    for p in net.parameters():
        p.grad = None


def make_setup(args: argparse.Namespace, *, warm: bool = True) -> Setup:
    torch.manual_seed(0)
    model = convlens.load_model(args.model).to(args.device)
    net = model.net.eval()
    head = SplitHead(net).eval()
    n = max(args.batch, args.slow_batch, args.occlusion_batch)
    with (args.data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    files = [r["file"] for r in rows]
    x = model.load_images([args.data / f for f in files]).to(args.device)
    with torch.no_grad():
        logits = net(x)
        check = head(x)
    diff = float((logits - check).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"SplitHead does not reproduce the network: max |diff| {diff:.3g}")
    # Warm-up: lazy init, and glibc's mmap threshold grows only after a backward pass freed its
    # large buffers (see benchmarks/README.md).
    if warm:
        xi = x.clone().requires_grad_(True)
        net(xi).max(dim=1).values.sum().backward()
        clear_grads(net)
    return Setup(model, net, head, x, logits.argmax(dim=1), files)


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One library's call on the pair's batch.

    ``run`` returns the library's output; ``to_map`` turns it into comparable (B, H, W) maps.
    """

    label: str
    run: Callable[[], Any]
    to_map: Callable[[Any], np.ndarray]
    convlens: bool
    note: str = ""
    timed: bool = True  # False: run once (the warm-up call) for agreement only
    group: int | None = None  # sides with the same group run with the same settings
    # peers: run under convlens.hooks.full_float32 (as convlens' methods do) unless
    # --peer-precision default; False: never (a side that shows the peer's default precision)
    full_float32: bool = True


@dataclass
class Pair:
    """Sides to compare: the first convlens and the first peer side are the headline."""

    name: str
    title: str
    batch: int
    sides: list[Side]
    goal: str = ""
    pick_best_peer: bool = False  # time every peer side once, keep the fastest for repeats


def _cam_map_convlens(exp: convlens.Explanation) -> np.ndarray:
    """convlens CAM at layer resolution through pytorch-grad-cam's own min-max + resize."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    raw = exp.raw_maps if exp.raw_maps is not None else exp.maps
    h, w = exp.maps.shape[-2:]
    return scale_cam_image(raw[:, 0].cpu().numpy(), (w, h))


def _identity_map(out: Any) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu()
    return np.asarray(out, dtype=np.float32)


def _conv_maps(exp: convlens.Explanation) -> np.ndarray:
    return exp.maps[:, 0].cpu().numpy()


def pair_cam(s: Setup, name: str, args: argparse.Namespace) -> Pair:
    from pytorch_grad_cam import AblationCAM as PgcAblation
    from pytorch_grad_cam import GradCAM as PgcGradCAM
    from pytorch_grad_cam import GradCAMPlusPlus as PgcPlusPlus
    from pytorch_grad_cam import ScoreCAM as PgcScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    b = args.slow_batch if name in ("scorecam", "ablationcam") else args.batch
    x, targets = s.batch(b)
    layers = [s.head.swish_head]
    pgc_targets = [ClassifierOutputTarget(t) for t in targets]
    model = s.model

    def peer(cls: type, batch_size: int | None = None) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with cls(model=s.head, target_layers=layers) as cam:
                if batch_size is not None:
                    cam.batch_size = batch_size
                out = cam(input_tensor=x, targets=pgc_targets)
            clear_grads(s.net)
            return out

        return run

    def mine(method: convlens.Method) -> Callable[[], convlens.Explanation]:
        return lambda: method(model, x)

    goal = ""
    if name == "gradcam":
        sides = [
            Side("convlens GradCAM", mine(convlens.GradCAM()), _cam_map_convlens, True),
            Side("pytorch-grad-cam GradCAM", peer(PgcGradCAM), _identity_map, False),
        ]
        title = "Grad-CAM"
    elif name == "gradcam++":
        sides = [
            Side(
                "convlens GradCAMPlusPlus",
                mine(convlens.GradCAMPlusPlus()),
                _cam_map_convlens,
                True,
            ),
            Side("pytorch-grad-cam GradCAMPlusPlus", peer(PgcPlusPlus), _identity_map, False),
        ]
        title = "Grad-CAM++"
    elif name == "scorecam":
        sides = []
        for bs in args.scorecam_batch:
            same = ScoreCAM(score="logit", channel_softmax=True, align_corners=True, batch_size=bs)
            sides += [
                Side(
                    f"convlens ScoreCAM (batch {bs})", mine(same), _cam_map_convlens, True, group=bs
                ),
                Side(
                    f"pytorch-grad-cam ScoreCAM (batch {bs})",
                    peer(PgcScoreCAM, bs),
                    _identity_map,
                    False,
                    group=bs,
                ),
            ]
        with torch.no_grad(), layer_capture(s.net, "_swish") as cap:
            s.net(x)
            act = cap.output(-1).flatten(2)
        const = ((act.amax(2) - act.amin(2)) == 0).sum(1).tolist()
        sides[0].note = (
            f"constant (all-zero) channels at the layer: {', '.join(map(str, const))} of "
            f"{act.shape[1]} per image; their masks are 0, so all of them score the same "
            "all-zero input"
        )
        default = ScoreCAM(score="logit", channel_softmax=True, align_corners=True)
        sides.append(
            Side(
                "convlens ScoreCAM (default batch_size)",
                mine(default),
                _cam_map_convlens,
                True,
                "untimed (one call)",
                timed=False,
            )
        )
        title = "Score-CAM"
        goal = ">= 2x faster at equal output"
    elif name == "ablationcam":
        sides = [
            Side(
                "convlens AblationCAM (closed form)", mine(AblationCAM()), _cam_map_convlens, True
            ),
            Side(
                "pytorch-grad-cam AblationCAM (ratio 1.0, batch 32)",
                peer(PgcAblation),
                _identity_map,
                False,
            ),
            Side(
                "convlens AblationCAM(exact='never') (forward-pass ablation)",
                mine(AblationCAM(exact="never")),
                _cam_map_convlens,
                True,
                "untimed (one call); the suffix-only re-run falls back to whole-network "
                "re-runs on this model",
                timed=False,
            ),
        ]
        title = "Ablation-CAM"
        goal = ">= 20x faster"
    else:
        raise ValueError(name)
    return Pair(name, title, b, sides, goal)


def pair_intgrad(s: Setup, args: argparse.Namespace) -> Pair:
    from captum.attr import IntegratedGradients as CaptumIG

    x, targets = s.batch(args.batch)
    steps, ib = args.ig_steps, args.ig_internal_batch
    every = steps * len(targets)  # all path points of all images in one pass
    ig = CaptumIG(s.net)

    def captum(internal: int | None, *, equal_work: bool = False) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if equal_work:  # what convlens does inside its call: the targets and the delta
                with torch.no_grad():
                    top = s.net(x).argmax(dim=1)
                out, _delta = ig.attribute(
                    x,
                    target=top,
                    n_steps=steps,
                    method="gausslegendre",
                    internal_batch_size=internal,
                    return_convergence_delta=True,
                )
                return out.detach()
            return ig.attribute(
                x,
                target=targets,
                n_steps=steps,
                method="gausslegendre",
                internal_batch_size=internal,
            ).detach()

        return run

    def captum_map(out: torch.Tensor) -> np.ndarray:
        return out.sum(dim=1).cpu().numpy()

    def mine(batch_size: int, **kw: Any) -> Callable[[], convlens.Explanation]:
        method = IntegratedGradients(steps=steps, rule="gausslegendre", batch_size=batch_size, **kw)
        return lambda: method(s.model, x)

    def variants(group: int) -> list[Side]:
        """Other graph settings at the same points per pass (after the headline sides)."""
        if not args.ig_variants:
            return []
        out = [
            Side(
                f"convlens IntegratedGradients ({steps} steps, batch_size {group}, {label})",
                mine(group, **kw),
                _conv_maps,
                True,
                group=group,
            )
            for label, kw in (
                ("graph='lean'", {"graph": "lean"}),
                ("channels_last=True", {"channels_last": True}),
                ("channels_last=False", {"channels_last": False}),
                (
                    "fuse=False, graph='lean': before the folded copy",
                    {"fuse": False, "graph": "lean"},
                ),
            )
        ]
        internal = group if group < every else None
        out.append(
            Side(
                f"captum IntegratedGradients ({steps} steps, internal_batch_size {internal}), "
                "top-1 targets and convergence delta inside the call (as convlens)",
                captum(internal, equal_work=True),
                captum_map,
                False,
                group=group,
            )
        )
        if x.device.type == "cuda":
            out.append(
                Side(
                    f"captum IntegratedGradients ({steps} steps, internal_batch_size "
                    f"{group if group < every else None}), TF32 convolutions (torch's default)",
                    captum(group if group < every else None),
                    captum_map,
                    False,
                    group=group,
                    full_float32=False,
                )
            )
        return out

    default = IntegratedGradients(steps=steps).points_per_pass(x)
    sides = [
        Side(
            f"convlens IntegratedGradients ({steps} steps, batch_size {ib})",
            mine(ib),
            _conv_maps,
            True,
            group=ib,
        ),
        Side(
            f"captum IntegratedGradients ({steps} steps, internal_batch_size {ib})",
            captum(ib),
            captum_map,
            False,
            group=ib,
        ),
        *variants(ib),
    ]
    if ib < every:
        sides += [
            Side(
                f"convlens IntegratedGradients ({steps} steps, batch_size {every}: all at once)",
                mine(every),
                _conv_maps,
                True,
                group=every,
            ),
            Side(
                f"captum IntegratedGradients ({steps} steps, internal_batch_size None: its "
                f"default, all {every} at once)",
                captum(None),
                captum_map,
                False,
                group=every,
            ),
            *variants(every),
        ]
    headline: dict[int | None, Side] = {}
    for side in sides:
        if side.convlens:
            headline.setdefault(side.group, side)  # the first convlens side of each group
    for side in sides:
        if side.convlens and side.group == default and headline.get(side.group) is side:
            side.note = f"convlens' default on {x.device.type} ({default} points per pass)"
        elif not side.convlens and "None" in side.label:
            side.note = "Captum's default"
    return Pair(
        "intgrad",
        "Integrated gradients",
        args.batch,
        sides,
        goal="no slower than Captum at equal steps, lower peak memory",
    )


def pair_smoothgrad(s: Setup, args: argparse.Namespace) -> Pair:
    from captum.attr import NoiseTunnel, Saliency

    x, targets = s.batch(args.batch)
    n, per, noise = args.sg_samples, args.sg_batch, args.sg_noise
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).tolist()
    sigmas = [noise * v for v in span]
    nt = NoiseTunnel(Saliency(s.net))
    same_sigma = max(sigmas) - min(sigmas) < 1e-6

    def run() -> torch.Tensor:
        # Captum takes one absolute sigma per input tensor; convlens uses noise * range per
        # image. Equal ranges (the usual case): one call; else one call per image.
        if same_sigma:
            return nt.attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=n,
                nt_samples_batch_size=per,
                stdevs=sigmas[0],
                target=targets,
            ).detach()
        return torch.cat(
            [
                nt.attribute(
                    x[i : i + 1],
                    nt_type="smoothgrad",
                    nt_samples=n,
                    nt_samples_batch_size=per,
                    stdevs=sigmas[i],
                    target=targets[i],
                ).detach()
                for i in range(len(targets))
            ]
        )

    def captum_map(out: torch.Tensor) -> np.ndarray:
        return out.amax(dim=1).cpu().numpy()  # convlens: mean over samples of max_c |g|

    note = f"sigma {', '.join(f'{v:.3f}' for v in sorted(set(sigmas)))}"
    b = len(targets)
    peer_pass = per * b if same_sigma else per  # images per forward/backward pass
    # convlens' batch_size counts noisy images per pass (all input images together).
    mine = convlens.SmoothGrad(samples=n, noise=noise, batch_size=peer_pass)
    other_seed = convlens.SmoothGrad(samples=n, noise=noise, batch_size=peer_pass, seed=1)
    sides = [
        Side(
            f"convlens SmoothGrad ({n} samples, batch_size={peer_pass})",
            lambda: mine(s.model, x),
            _conv_maps,
            True,
            note,
        ),
        Side(
            f"captum NoiseTunnel(Saliency) ({n} samples, nt_samples_batch_size={per})",
            run,
            captum_map,
            False,
            "" if same_sigma else "one call per image (Captum takes one sigma per input tensor)",
        ),
        Side(
            f"convlens SmoothGrad ({n} samples, seed 1): noise floor of the agreement",
            lambda: other_seed(s.model, x),
            _conv_maps,
            True,
            "untimed; r vs the peer shows how well two independent noise draws agree",
            timed=False,
        ),
    ]
    return Pair("smoothgrad", "SmoothGrad", args.batch, sides)


def pair_occlusion(s: Setup, args: argparse.Namespace) -> Pair:
    from captum.attr import Occlusion as CaptumOcclusion

    x, targets = s.batch(args.occlusion_batch)
    mine = convlens.Occlusion(patch=16, stride=8, fill=0.0, score="prob")
    small = convlens.Occlusion(
        patch=16, stride=8, fill=0.0, score="prob", batch_size=args.occlusion_conv_batch
    )
    occ = CaptumOcclusion(SoftmaxNet(s.net))

    def captum(ppe: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            return occ.attribute(
                x,
                sliding_window_shapes=(3, 16, 16),
                strides=(3, 8, 8),
                baselines=0.0,
                target=targets,
                perturbations_per_eval=ppe,
            ).detach()

        return run

    def captum_map(out: torch.Tensor) -> np.ndarray:
        return out[:, 0].cpu().numpy()

    return Pair(
        "occlusion",
        "Occlusion",
        args.occlusion_batch,
        [
            Side(
                "convlens Occlusion (16/8, fill 0, prob; default batch from memory_mb)",
                lambda: mine(s.model, x),
                _conv_maps,
                True,
            ),
            Side(
                f"convlens Occlusion (batch_size={args.occlusion_conv_batch})",
                lambda: small(s.model, x),
                _conv_maps,
                True,
            ),
            *[
                Side(f"captum Occlusion (perturbations_per_eval {p})", captum(p), captum_map, False)
                for p in args.occlusion_ppe
            ],
        ],
        pick_best_peer=True,
    )


def build_pair(s: Setup, name: str, args: argparse.Namespace) -> Pair:
    if name in ("gradcam", "gradcam++", "scorecam", "ablationcam"):
        pair = pair_cam(s, name, args)
    elif name == "intgrad":
        pair = pair_intgrad(s, args)
    elif name == "smoothgrad":
        pair = pair_smoothgrad(s, args)
    elif name == "occlusion":
        pair = pair_occlusion(s, args)
    else:
        raise ValueError(name)
    if s.x.device.type == "cuda":
        for side in pair.sides:
            if not side.convlens and side.full_float32 and args.peer_precision == "same":
                side.run = _in_full_float32(side.run)
                side.note = "; ".join(filter(None, [side.note, "full float32 (as convlens)"]))
    return pair


def _in_full_float32(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` inside :func:`convlens.hooks.full_float32`: cuDNN convolves float32 in TF32 by
    default, convlens' methods never do; the same precision on both sides compares equal
    work (and equal maps)."""

    def wrapped() -> Any:
        with full_float32():
            return run()

    return wrapped


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Measurements of one side."""

    side: Side
    warmup: float = 0.0
    warmup_forward: float = 0.0  # plain forward timed just before the warm-up call
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of each call
    forwards: list[float] = field(default_factory=list)  # plain forwards timed alongside
    images_forwarded: int = 0
    largest_pass: int = 0
    output: Any = None  # of the warm-up call
    last: Any = None  # of the last timed call
    memory: dict[str, Any] | None = None

    @property
    def median(self) -> float:
        """Median of the timed calls (the warm-up call for a side only used to select)."""
        return statistics.median(self.seconds) if self.seconds else self.warmup

    @property
    def cost(self) -> float:
        """Median in units of one plain no-grad forward of the same batch."""
        fwd = statistics.median(self.forwards) if self.forwards else self.warmup_forward
        return self.median / fwd


def count_forwards(modules: Sequence[nn.Module]) -> tuple[list[int], Callable[[], None]]:
    """Sum (and max) of the batch sizes entering any of ``modules``: ``[sum, max]`` and a
    remover of the hooks."""
    total = [0, 0]

    def pre(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            total[0] += int(inputs[0].shape[0])
            total[1] = max(total[1], int(inputs[0].shape[0]))

    handles = [m.register_forward_pre_hook(pre) for m in modules]

    def remove() -> None:
        for h in handles:
            h.remove()

    return total, remove


def plain_forward(s: Setup, b: int) -> Callable[[], object]:
    x = s.x[:b]

    def run() -> object:
        with torch.no_grad():
            return s.net(x)

    return run


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU), so that a timer measures whole calls."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def cuda_memory(fn: Callable[[], object]) -> dict[str, Any]:
    """Peak CUDA memory of one call: ``torch.cuda.max_memory_allocated`` after a reset.

    Counts tensors (model, inputs and whatever the call allocates, cuDNN workspaces included),
    not the caching allocator's reserve. ``extra_mb``: the peak minus what was allocated before.
    """
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated()
    return {
        "peak_mb": peak / MB,
        "extra_mb": (peak - before) / MB,
        "raised_peak": True,
        "kind": "cuda",
    }


def measure_pair(s: Setup, pair: Pair, repeats: int) -> list[Timing]:
    """Warm up every side once (counting forwards), then ``repeats`` interleaved rounds."""
    fwd = plain_forward(s, pair.batch)
    fwd()
    timings = [Timing(side) for side in pair.sides]
    for t in timings:
        t.warmup_forward = timed(fwd)[0]
        total, remove = count_forwards([s.net, s.head])
        try:
            t.warmup, t.output = timed(t.side.run)
        finally:
            remove()
        t.images_forwarded, t.largest_pass = total
        print(f"  warm-up {t.side.label}: {t.warmup:.2f} s", file=sys.stderr, flush=True)
        if isinstance(t.output, convlens.Explanation) and t.output.meta.get("fused") is False:
            # the counting hooks kept convlens on the network itself: warm up its folded copy
            # too (made on the first call without hooks), untimed
            t.side.run()
    active = [t for t in timings if t.side.timed]
    if pair.pick_best_peer:  # the warm-up calls select the fastest peer setting
        peers = [t for t in timings if not t.side.convlens]
        best = min(peers, key=lambda t: t.warmup / t.warmup_forward)
        active = [t for t in active if t.side.convlens or t is best]
    for r in range(repeats):
        order = active if r % 2 == 0 else active[::-1]
        for t in order:
            t.forwards.append(timed(fwd)[0])
            cpu = time.process_time()
            seconds, out = timed(t.side.run)
            t.cpu_seconds.append(time.process_time() - cpu)
            t.seconds.append(seconds)
            t.last = out
            print(f"  repeat {r + 1} {t.side.label}: {seconds:.2f} s", file=sys.stderr, flush=True)
    for t in timings:
        # The meta of a timed call: the warm-up ran with the counting hooks, which keep
        # convlens from using its folded copy of the network.
        out = t.last if t.last is not None else t.output
        if isinstance(out, convlens.Explanation):
            info = [f"{k}={out.meta[k]}" for k in META_KEYS if k in out.meta]
            if out.layer:
                info.append(f"layer={out.layer}")
            t.side.note = "; ".join(filter(None, [t.side.note, *info]))
    return timings


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Smallest per-image Pearson r and largest max-abs-diff of min-max-normalised maps."""
    rs, diffs = [], []
    for u, v in zip(a.reshape(len(a), -1), b.reshape(len(b), -1), strict=True):
        u64, v64 = u.astype(np.float64), v.astype(np.float64)
        rs.append(float(np.corrcoef(u64, v64)[0, 1]))

        def norm(z: np.ndarray) -> np.ndarray:
            span = z.max() - z.min()
            return (z - z.min()) / span if span > 0 else np.zeros_like(z)

        diffs.append(float(np.abs(norm(u64) - norm(v64)).max()))
    return min(rs), max(diffs)


# --------------------------------------------------------------------------------------------
# Peak memory (fresh subprocess per measurement)
# --------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def rss_now() -> float:
    """Current resident set size, MB."""
    return _status_mb("VmRSS")


def peak_rss() -> float:
    """Peak RSS of this process's address space, MB (``VmHWM``).

    ``getrusage``'s ``ru_maxrss`` is not used: a child started with vfork/posix_spawn inherits
    the parent's high-water mark through ``exec``, so it would report the parent's peak.
    """
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def child_memory(args: argparse.Namespace) -> int:
    """Run one side once in this fresh process and print its memory as JSON."""
    torch.set_num_threads(args.threads)
    import_peers()
    s = make_setup(args, warm=False)
    name, index = args.child_memory.rsplit(":", 1)
    pair = build_pair(s, name, args)
    side = pair.sides[int(index)]
    plain_forward(s, pair.batch)()
    reset = reset_peak_rss()
    before, peak_before = rss_now(), peak_rss()
    start = time.perf_counter()
    side.run()
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(
        json.dumps(
            {
                "label": side.label,
                "rss_before_mb": before,
                "peak_before_mb": peak_before,
                "peak_mb": peak,
                "extra_mb": peak - before,
                "raised_peak": peak > peak_before,
                "peak_reset": reset,
                "seconds": seconds,
            }
        )
    )
    return 0


def measure_memory(pair: Pair, index: int, argv: Sequence[str]) -> dict[str, float] | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *argv,
        "--child-memory",
        f"{pair.name}:{index}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  memory child failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  memory {result['label']}: peak {result['peak_mb']:.0f} MB, "
        f"+{result['extra_mb']:.0f} MB over the RSS before the call",
        file=sys.stderr,
    )
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class PairResult:
    pair: Pair
    timings: list[Timing]

    def headline(self) -> tuple[Timing, Timing]:
        mine = next(t for t in self.timings if t.side.convlens)
        peers = [t for t in self.timings if not t.side.convlens]
        timed_peers = [t for t in peers if t.seconds]  # the selected one when several
        return mine, (timed_peers or peers)[0]


def goal_verdict(res: PairResult, agree: tuple[float, float]) -> str:
    mine, peer = res.headline()
    speedup = peer.median / mine.median
    name = res.pair.name
    if name == "scorecam":
        equal = agree[0] > 0.9999 and agree[1] < 1e-3
        timed_sides = [t for t in res.timings if t.seconds]
        ratios = []
        for g in dict.fromkeys(t.side.group for t in timed_sides):
            c = [t for t in timed_sides if t.side.group == g and t.side.convlens]
            q = [t for t in timed_sides if t.side.group == g and not t.side.convlens]
            if c and q:
                ratios.append(f"{q[0].median / c[0].median:.2f}x at batch {g} (both)")
        best = min((t for t in timed_sides if t.side.convlens), key=lambda t: t.median)
        best_ratio = peer.median / best.median
        ok = max(speedup, best_ratio) >= 2.0 and equal
        return (
            f"{'MET' if ok else 'NOT MET'} (goal >= 2x): {', '.join(ratios)}; convlens at "
            f"batch {best.side.group} vs peer at batch {peer.side.group}: {best_ratio:.2f}x; "
            f"output {'equal' if equal else 'NOT equal'}"
        )
    if name == "ablationcam":
        return f"{'MET' if speedup >= 20 else 'NOT MET'}: {speedup:.0f}x (goal >= 20x)"
    if name == "intgrad":
        # Per group (the same points per pass on both sides): speed and peak memory.
        parts = []
        for g in dict.fromkeys(t.side.group for t in res.timings):
            c = [t for t in res.timings if t.side.group == g and t.side.convlens]
            q = [t for t in res.timings if t.side.group == g and not t.side.convlens]
            if not (c and q):
                continue
            ratio = q[0].median / c[0].median
            part = f"batch {g}: speed {'MET' if ratio >= 1.0 else 'NOT MET'} ({ratio:.2f}x)"
            if c[0].cpu_seconds and q[0].cpu_seconds:
                cpu = statistics.median(q[0].cpu_seconds) / statistics.median(c[0].cpu_seconds)
                part += f" (process CPU time {cpu:.2f}x)"
            if c[0].memory and q[0].memory:
                a, b = c[0].memory["peak_mb"], q[0].memory["peak_mb"]
                word = "MET" if a < 0.98 * b else "NOT MET"
                part += f", peak memory {word} ({a:.0f} vs {b:.0f} MB)"
            parts.append(part)
        return "; ".join(parts)
    return ""


def fmt_mem(t: Timing) -> str:
    if not t.memory:
        return "–"
    m = t.memory
    extra = f"+{m['extra_mb']:.0f}" if m["raised_peak"] else f"<= +{m['extra_mb']:.0f}"
    return f"{m['peak_mb']:.0f} ({extra})"


def render(
    results: list[PairResult], meta: dict[str, str], memory_label: str = "peak RSS MB"
) -> str:
    lines = [
        "| method | convlens s/img | peer s/img | speed-up | convlens cost (fwd) | "
        "peer cost (fwd) | images forwarded convlens / peer | Pearson r | max abs diff | "
        "goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    extra: list[str] = []
    for res in results:
        mine, peer = res.headline()
        b = res.pair.batch
        agree = agreement(mine.side.to_map(mine.output), peer.side.to_map(peer.output))
        verdict = goal_verdict(res, agree)
        lines.append(
            f"| {res.pair.title} (batch {b}) | {mine.median / b:.4f} | {peer.median / b:.4f} | "
            f"{peer.median / mine.median:.2f}x | {mine.cost:.1f} | {peer.cost:.1f} | "
            f"{mine.images_forwarded / b:.1f} / {peer.images_forwarded / b:.1f} | "
            f"{agree[0]:.4f} | {agree[1]:.2e} | {verdict or '–'} |"
        )
        for t in res.timings:
            a = agreement(t.side.to_map(t.output), peer.side.to_map(peer.output))
            reps = f"warm-up {t.warmup:.2f}; " + ", ".join(f"{v:.2f}" for v in t.seconds)
            if t.cpu_seconds:
                reps += "; CPU " + ", ".join(f"{v:.2f}" for v in t.cpu_seconds)
            extra.append(
                f"| {res.pair.title} | {t.side.label} | {t.median / b:.4f} | "
                f"{peer.median / t.median:.2f}x | {t.cost:.1f} | "
                f"{t.images_forwarded / b:.1f} | {t.largest_pass} | "
                f"{fmt_mem(t)} | {a[0]:.4f} / {a[1]:.1e} | "
                f"{reps} | {t.side.note} |"
            )
    table = "\n".join(lines) + "\n"
    detail = (
        "\n".join(
            [
                "| pair | side | s/img | peer s / side s | cost (fwd) | images fwd/img | "
                f"largest pass | {memory_label} (extra) | "
                "r / max diff vs headline peer | seconds per call (wall; process CPU) | notes |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
                *extra,
            ]
        )
        + "\n"
    )
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return f"{head}\n\n{table}\n### All sides\n\n{detail}"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lite0")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda: model and images go there; timings synchronise the GPU; on cuda the "
        "peak memory of every side is torch.cuda.max_memory_allocated over one extra call",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 timed calls per side (slow pairs 1) instead of --repeats / --slow-repeats",
    )
    p.add_argument(
        "--data", type=Path, default=common.default_data(), help="folder with labels.csv"
    )
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    p.add_argument("--batch", type=int, default=4, help="images for the fast pairs")
    p.add_argument("--slow-batch", type=int, default=1, help="images for Score-/Ablation-CAM")
    p.add_argument("--occlusion-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    p.add_argument(
        "--slow-repeats",
        type=int,
        default=2,
        help="timed calls per side for Score-CAM, Ablation-CAM and occlusion",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for every side (1: on a shared 2-core machine, 2 threads"
        " contend with other processes and run far slower)",
    )
    p.add_argument(
        "--scorecam-batch",
        type=int,
        nargs="+",
        default=[16, 4],
        help="masked images per pass, both libraries, one pair of sides per value (the first"
        " is the headline; 16 is pytorch-grad-cam's default)",
    )
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument(
        "--ig-internal-batch",
        type=int,
        default=32,
        help="path points x images per pass, both libraries",
    )
    p.add_argument(
        "--ig-variants",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="extra convlens IG sides per batch (graph='lean', channels_last both ways, the "
        "unfused network) and, on cuda, Captum with TF32 convolutions",
    )
    p.add_argument(
        "--peer-precision",
        choices=("same", "default"),
        default="same",
        help="on cuda: run the peers' float32 convolutions in full float32 like convlens "
        "(same), or in torch's default (TF32 on Ampere and later)",
    )
    p.add_argument("--sg-samples", type=int, default=25)
    p.add_argument("--sg-batch", type=int, default=8, help="noisy copies per image per pass")
    p.add_argument("--sg-noise", type=float, default=0.15, help="sigma / (max - min)")
    p.add_argument(
        "--occlusion-ppe",
        type=int,
        nargs="+",
        default=[16, 32, 64],
        help="Captum perturbations_per_eval values to try (fastest kept)",
    )
    p.add_argument(
        "--occlusion-conv-batch",
        type=int,
        default=16,
        help="batch_size of an extra convlens occlusion side (the headline uses the default)",
    )
    p.add_argument(
        "--memory",
        nargs="*",
        choices=PAIRS,
        default=None,
        help="pairs whose sides' peak memory is measured: on cpu the RSS high-water mark of a "
        "fresh subprocess per side (default: intgrad), on cuda max_memory_allocated over one "
        "extra call (default: every pair)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shared_argv(args: argparse.Namespace) -> list[str]:
    """Options a memory child needs to rebuild the same pair."""
    return [
        "--model",
        args.model,
        "--data",
        str(args.data),
        "--batch",
        str(args.batch),
        "--slow-batch",
        str(args.slow_batch),
        "--occlusion-batch",
        str(args.occlusion_batch),
        "--threads",
        str(args.threads),
        "--scorecam-batch",
        *map(str, args.scorecam_batch),
        "--ig-steps",
        str(args.ig_steps),
        "--ig-internal-batch",
        str(args.ig_internal_batch),
        "--ig-variants" if args.ig_variants else "--no-ig-variants",
        "--peer-precision",
        args.peer_precision,
        "--sg-samples",
        str(args.sg_samples),
        "--sg-batch",
        str(args.sg_batch),
        "--sg-noise",
        str(args.sg_noise),
        "--occlusion-ppe",
        *map(str, args.occlusion_ppe),
        "--occlusion-conv-batch",
        str(args.occlusion_conv_batch),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    if args.memory is None:
        args.memory = list(PAIRS) if cuda else ["intgrad"]
    if args.quick:
        args.repeats, args.slow_repeats = min(args.repeats, 2), 1
    if args.child_memory:
        return child_memory(args)
    if not (args.data / "labels.csv").exists():
        print(f"no labels.csv in {args.data}; pass --data", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    versions = import_peers()
    start = time.time()
    load_before = common.load_average()
    s = make_setup(args)
    results: list[PairResult] = []
    failed: list[str] = []
    for name in args.pairs:
        try:
            pair = build_pair(s, name, args)
            slow = name in ("scorecam", "ablationcam", "occlusion")
            print(f"{pair.title} (batch {pair.batch})", file=sys.stderr, flush=True)
            timings = measure_pair(s, pair, args.slow_repeats if slow else args.repeats)
            if name in args.memory:
                for i, t in enumerate(timings):
                    if cuda:
                        t.memory = cuda_memory(t.side.run)
                        print(
                            f"  memory {t.side.label}: peak {t.memory['peak_mb']:.0f} MB "
                            f"(+{t.memory['extra_mb']:.0f} MB)",
                            file=sys.stderr,
                        )
                    else:
                        t.memory = measure_memory(pair, i, shared_argv(args))
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        results.append(PairResult(pair, timings))
    load_after = common.load_average()
    now = dt.datetime.now(dt.timezone.utc)
    device = "CPU"
    if cuda:
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{common.processor()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, {device}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "command": common.command_line(argv, script="benchmarks/bench_peers.py"),
        "model": f"{args.model}; images: first rows of `{args.data.name}/labels.csv` "
        f"({', '.join(s.files)}); targets: top-1 ({', '.join(map(str, s.targets.tolist()))})",
        "timing": f"one warm-up call per side, then median of {args.repeats} (slow pairs "
        f"{args.slow_repeats}) interleaved calls; cost = median / median plain no-grad forward "
        "of the same batch timed alongside",
        "load average (1 min)": f"{load_before:.2f} before, {load_after:.2f} after "
        f"({os.cpu_count()} cores shared with other processes: expect noise); "
        f"whole run {time.time() - start:.0f} s",
    }
    if failed:
        meta["failed pairs"] = ", ".join(failed) + " (see the run's stderr)"
    if cuda:
        meta["precision"] = (
            "convlens' methods convolve float32 in full float32 (never TF32); peers "
            + (
                "too (run inside convlens.hooks.full_float32), unless a side says TF32"
                if args.peer_precision == "same"
                else "in torch's default (TF32 convolutions on Ampere and later)"
            )
        )
        meta["peak memory"] = (
            "torch.cuda.max_memory_allocated over one extra call per side after the timed "
            "calls (reset before it; model and images included, the caching allocator's "
            "reserve not)"
        )
    body = render(results, meta, memory_label="peak CUDA MB" if cuda else "peak RSS MB")
    print(body)
    if not args.no_write:
        heading = f"## Peers, {now.strftime('%Y-%m-%d')} UTC, {'cuda' if cuda else 'cpu'}"
        common.write_section(args.out, heading, f"{heading}\n\n{body}", title=RESULTS_TITLE)
        print(f"wrote section {heading!r} to {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
