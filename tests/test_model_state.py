"""Every registered method leaves the user's model exactly as found, after success and after an
error injected halfway; batched results equal one-by-one results; inference mode is handled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens import InferenceModeError, get_method, list_methods
from convlens.methods import METHODS
from convlens.methods.base import Method
from tests.helpers.models import GapNet, TinyViT, images, seeded

FAST = {
    "occlusion": {"patch": 4, "stride": 4},
    "smoothgrad": {"samples": 3},
    "vargrad": {"samples": 3},
    "rise": {"masks": 40, "batch_size": 16},
    "intgrad": {"steps": 4},
}


def make(name: str) -> Method:
    return get_method(name, **FAST.get(name, {}))


class Boom(RuntimeError):
    pass


class Injected(nn.Module):
    """Identity that raises on its ``fail_at``-th call (counting from 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Boom("injected failure")
        return x


class FragileNet(GapNet):
    def __init__(self) -> None:
        super().__init__()
        self.trap = Injected()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return super().features(self.trap(x))


class FragileViT(TinyViT):
    """The tiny vision transformer (for the methods that need attention) with the trap on its
    input."""

    def __init__(self) -> None:
        super().__init__()
        self.trap = Injected()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.trap(x))


def for_method(name: str, cnn: nn.Module) -> nn.Module:
    """``cnn``, or the tiny vision transformer for methods that refuse CNNs."""
    return seeded(TinyViT()) if METHODS[name].needs_attention else cnn


def state(net: nn.Module) -> dict[str, object]:
    return {
        "training": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "values": [t.detach().clone() for t in net.state_dict().values()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "grad_ids": [id(p.grad) for p in net.parameters()],
        "attributes": [sorted(m.__dict__) for m in net.modules()],
        "hooks": [
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            for m in net.modules()
        ],
    }


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["training"] == b["training"]
    assert a["attributes"] == b["attributes"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["grad_ids"] == b["grad_ids"]
    assert a["hooks"] == b["hooks"] and not any(b["hooks"])  # type: ignore[arg-type]
    for x, y in zip(a["values"], b["values"], strict=True):  # type: ignore[call-overload]
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"], strict=True):  # type: ignore[call-overload]
        assert (x is None and y is None) or torch.equal(x, y)


def user_model(name: str) -> FragileNet | FragileViT:
    if METHODS[name].needs_attention:
        vit = seeded(FragileViT())
        assert isinstance(vit, FragileViT)
        vit.train()  # a user's model mid-training, with mixed flags and grads
        vit.ln.eval()
        vit.conv_proj.weight.requires_grad_(False)
        vit.head.weight.grad = torch.ones_like(vit.head.weight)
        return vit
    net = seeded(FragileNet())
    assert isinstance(net, FragileNet)
    net.train()  # a user's model mid-training, with mixed flags and grads
    net.bn.eval()
    net.conv1.weight.requires_grad_(False)
    net.fc.weight.grad = torch.ones_like(net.fc.weight)
    return net


@pytest.mark.parametrize("name", list_methods())
def test_model_left_as_found_after_success(name: str) -> None:
    net = user_model(name)
    before = state(net)
    x = images(2)
    x.requires_grad_(True)
    exp = make(name)(net, x)
    assert exp.maps.shape == (2, 1, 12, 12)
    assert torch.isfinite(exp.maps).all()
    assert x.requires_grad and x.grad is None
    assert_same(before, state(net))


@pytest.mark.parametrize("fail_at", [1, 2, 3])
@pytest.mark.parametrize("name", list_methods())
def test_model_left_as_found_after_failure(name: str, fail_at: int) -> None:
    net = user_model(name)
    before = state(net)
    net.trap.fail_at = fail_at
    try:
        make(name)(net, images(2))
    except Boom:
        pass
    else:
        assert net.trap.calls < fail_at  # the method finished before the trap fired
    assert_same(before, state(net))


@pytest.mark.parametrize("name", list_methods())
def test_batched_equals_one_by_one(name: str, gap_net: nn.Module) -> None:
    gap_net = for_method(name, gap_net)
    # SmoothGrad's noise depends on the batch layout; its average is tested on its own.
    opts = {"noise": 0.0} if name in ("smoothgrad", "vargrad") else {}
    x = images(3)
    together = make(name)(gap_net, x, top_k=2)
    if opts:
        together = get_method(name, **FAST[name], **opts)(gap_net, x, top_k=2)
    for i in range(3):
        alone = get_method(name, **FAST.get(name, {}), **opts)(gap_net, x[i : i + 1], top_k=2)
        assert torch.equal(alone.targets, together.targets[i : i + 1])
        torch.testing.assert_close(alone.maps, together.maps[i : i + 1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list_methods())
def test_inference_mode(name: str, gap_net: nn.Module) -> None:
    gap_net = for_method(name, gap_net)
    method = make(name)
    with torch.inference_mode():
        if method.uses_gradients:
            with pytest.raises(InferenceModeError, match="inference_mode"):
                method(gap_net, images(1))
        else:
            assert method(gap_net, images(1)).maps.shape == (1, 1, 12, 12)


def test_model_built_in_inference_mode_is_reported() -> None:
    with torch.inference_mode():
        net = seeded(GapNet())
    x = images(1)
    with pytest.raises(InferenceModeError, match="parameters"):
        get_method("saliency")(net, x)
    assert get_method("cam")(net, x).maps.shape == (1, 1, 12, 12)


def test_inference_tensor_input_is_accepted(gap_net: nn.Module) -> None:
    with torch.inference_mode():
        x = images(1).clone()
    assert x.is_inference()
    assert get_method("gradcam")(gap_net, x).maps.shape == (1, 1, 12, 12)


class SelfEditing(GapNet):
    """A model whose own forward writes a buffer in place (as some user code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_in_place_changes_by_the_model_itself_are_reported() -> None:
    net = seeded(SelfEditing())
    with pytest.warns(RuntimeWarning, match="calls"):
        get_method("gradcam")(net, images(1))


def _precision() -> tuple[str, ...]:
    b = torch.backends
    return (b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision)


def test_methods_run_convolutions_in_full_float32_and_restore_the_settings() -> None:
    """cuDNN's TF32 is switched off for the call (it moved saliency maps by 28% on an H100)
    and the process-wide settings are restored afterwards, also after an error."""
    seen: list[tuple[str, ...]] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(_precision())
            return x

    net = seeded(GapNet())
    net.spy = Spy()
    net.features = lambda x: GapNet.features(net, net.spy(x))  # type: ignore[method-assign]
    before = _precision()
    assert before[0] == "tf32"  # PyTorch's default for cuDNN convolutions
    make("saliency")(net, images())
    assert seen and all(p == ("ieee", "ieee", "ieee") for p in seen)
    assert _precision() == before
    net.spy.forward = lambda x: (_ for _ in ()).throw(Boom("x"))  # type: ignore[method-assign]
    with pytest.raises(Boom):
        make("saliency")(net, images())
    assert _precision() == before


def test_full_float32_with_the_global_precision_setting_and_overlapping_calls() -> None:
    """A user who set ``torch.backends.fp32_precision`` (after which PyTorch refuses to read the
    legacy flags) can still run methods; overlapping calls restore the settings once, at the
    end of the last."""
    from convlens.hooks import full_float32

    b = torch.backends
    saved = b.fp32_precision, _precision()
    try:
        b.fp32_precision = "tf32"
        before = _precision()
        make("gradcam")(seeded(GapNet()), images())
        assert _precision() == before
        a, c = full_float32(), full_float32()
        a.__enter__()
        c.__enter__()
        a.__exit__(None, None, None)
        assert _precision() == ("ieee", "ieee", "ieee")  # c still runs
        c.__exit__(None, None, None)
        assert _precision() == before
    finally:
        b.fp32_precision = saved[0]
        b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved[1][:2]
        b.cuda.matmul.fp32_precision = saved[1][2]


def test_tf32_convolutions_reads_the_setting_without_raising() -> None:
    """The tolerance checks ask whether convolutions may run in TF32; reading the legacy flag
    raises once the new per-operator API is in use (as inside full_float32) - this must not."""
    from convlens.hooks import full_float32, tf32_convolutions

    b = torch.backends
    saved = b.fp32_precision, _precision()
    try:
        assert tf32_convolutions() is True  # PyTorch's default for cuDNN convolutions
        with full_float32():
            assert tf32_convolutions() is False
        b.fp32_precision = "tf32"
        assert tf32_convolutions() is True
        b.cudnn.conv.fp32_precision = "ieee"
        assert tf32_convolutions() is False
    finally:
        b.fp32_precision = saved[0]
        b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = saved[1][:2]
        b.cuda.matmul.fp32_precision = saved[1][2]
