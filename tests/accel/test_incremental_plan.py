"""The plan of incremental occlusion (convlens.accel.incremental.plan): one StepKind per node,
one handler per kind, and the plan of a small net with every kind of rule."""

from __future__ import annotations

import torch
from torch import nn

from convlens.accel.incremental import IncrementalEngine, StepKind
from convlens.accel.incremental.engine import _HANDLERS


class EveryRule(nn.Module):
    """Convolution + BatchNorm (folded) + ReLU, constant padding, a residual sum, a product with
    a per-channel constant, a channel concatenation, max pooling, then global pooling and a
    linear head (computed in full)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.down = nn.Conv2d(4, 4, 2)
        self.side = nn.Conv2d(4, 2, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6, 5)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        z = self.down(self.pad(y)) + y
        z = z * self.scale
        h = self.pool(torch.cat([z, self.side(z)], dim=1))
        return self.fc(torch.flatten(h.mean(dim=(2, 3), keepdim=True), 1))


def _net() -> nn.Module:
    torch.manual_seed(3)
    net = EveryRule()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_every_step_kind_but_the_output_has_a_handler() -> None:
    assert set(_HANDLERS) == set(StepKind) - {StepKind.OUTPUT}


def test_plan_names_each_rule_and_runs_equal_to_the_model() -> None:
    net = _net()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    starts = [0, 4, 8, 12]
    engine = IncrementalEngine(net, x, 4, starts, starts)
    kinds = {node.name: step.kind for node, step in engine.steps.items()}
    assert kinds["x"] is StepKind.INPUT
    assert kinds["conv"] is StepKind.WINDOW
    assert kinds["bn"] is StepKind.PASS  # folded into the convolution before it
    assert kinds["relu"] is StepKind.POINT
    assert kinds["pad"] is StepKind.PASS
    assert kinds["down"] is StepKind.WINDOW
    assert kinds["add"] is StepKind.BINARY
    assert kinds["scale"] is StepKind.CONST
    assert kinds["mul"] is StepKind.POINT
    assert kinds["cat"] is StepKind.CAT
    assert kinds["pool"] is StepKind.WINDOW
    assert kinds["mean"] is StepKind.FULL
    assert kinds["fc"] is StepKind.FULL
    assert kinds["output"] is StepKind.OUTPUT
    assert engine.full_from() == "mean"

    n = len(starts)
    img = torch.arange(2).repeat_interleave(n * n)
    pos = torch.arange(n * n).repeat(2)
    iy, ix = pos // n, pos % n
    fill = torch.zeros_like(x)
    got = engine.run(fill, img, iy, ix)
    occluded = x[img].clone()
    for k in range(len(img)):
        r, c = starts[int(iy[k])], starts[int(ix[k])]
        occluded[k, :, r : r + 4, c : c + 4] = 0.0
    with torch.no_grad():
        want = net(occluded)
    assert float((got - want).abs().max()) <= 2e-6
