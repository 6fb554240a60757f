"""The acceleration layer (convlens.accel): every registered method gives the same result with
the default accelerators, with none (``Acceleration.plain()``), and with each accelerator
switched alone; the plain path uses none of them; the choice depends on the settings and the
job only; the caches can be cleared."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from convlens import explain, get_method, list_methods
from convlens.accel import Acceleration, clear_caches
from convlens.accel import compiled as compiled_mod
from convlens.accel import folded as folded_mod
from convlens.accel import settings as settings_mod
from convlens.accel.lean_graph import InputGradientMode
from convlens.errors import InputError
from convlens.methods import METHODS, perturbation
from convlens.models import wrap_model
from convlens.result import Explanation
from tests.helpers.models import GapNet, TinyViT, images, seeded

#: Small settings so that each method runs in well under a second on the tiny model.
FAST: dict[str, dict[str, Any]] = {
    "occlusion": {"patch": 4, "stride": 4},
    "smoothgrad": {"samples": 3},
    "vargrad": {"samples": 3},
    "rise": {"masks": 40, "batch_size": 16},
    "intgrad": {"steps": 4},
}

#: Per field, the value that switches the accelerator on (``channels_last=True`` forces it
#: on any device; ``compile=True`` compiles only where a method compiles: occlusion's suffix).
ON: dict[str, Any] = {
    "fold_batchnorm": True,
    "lean_graph": True,
    "channels_last": True,
    "compile": True,
    "incremental": True,
    "threads": 2,
}


def _settings() -> list[tuple[str, Acceleration]]:
    """The default, and each accelerator alone on (from plain) and alone off (from default)."""
    plain, default = Acceleration.plain(), Acceleration()
    assert {f.name for f in dataclasses.fields(Acceleration)} == set(ON)
    out = [("default", default)]
    for name, value in ON.items():
        out.append((f"only {name}", plain.but(**{name: value})))
        out.append((f"all but {name}", default.but(**{name: getattr(plain, name)})))
    return out


def _net(dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv -> ReLU -> conv -> BatchNorm -> ReLU -> GAP -> linear: a pair to fold."""
    return seeded(GapNet(), dtype=dtype)


def _run(name: str, net: nn.Module, x: torch.Tensor, accel: Acceleration) -> Explanation:
    if METHODS[name].needs_attention:  # refuses CNNs: the tiny vision transformer instead
        net = seeded(TinyViT(), dtype=next(net.parameters()).dtype)
    return get_method(name, **FAST.get(name, {}))(net, x, top_k=2, accel=accel)


def _assert_equal(got: Explanation, ref: Explanation, what: str, tol: float) -> None:
    assert torch.equal(got.targets, ref.targets), what
    torch.testing.assert_close(got.scores, ref.scores, atol=tol, rtol=tol, msg=what)
    torch.testing.assert_close(got.maps, ref.maps, atol=tol, rtol=tol, msg=what)
    if ref.attributions is not None:
        assert got.attributions is not None, what
        torch.testing.assert_close(got.attributions, ref.attributions, atol=tol, rtol=tol, msg=what)


@pytest.mark.parametrize("name", list_methods())
def test_every_accelerator_equals_the_plain_path(name: str) -> None:
    """In float64 the accelerators change only the rounding: equal to 1e-9."""
    net, x = _net(), images(2)
    plain = _run(name, net, x, Acceleration.plain())
    for label, accel in _settings():
        if accel.compile is True and name == "occlusion" and not settings_mod.compiler_available():
            continue  # compiling needs a C++ compiler
        _assert_equal(_run(name, net, x, accel), plain, f"{name}, {label}", 1e-9)


@pytest.mark.skipif(not settings_mod.compiler_available(), reason="needs a C++ compiler")
def test_compiled_occlusion_equals_the_plain_path() -> None:
    """``compile=True`` on top of the other accelerators (the one method that compiles: the
    fully computed end of incremental occlusion)."""
    net, x = _net(), images(2)
    clear_caches()
    got = _run("occlusion", net, x, Acceleration(compile=True))
    (entries,) = compiled_mod._CACHE.values()
    assert [fwd.compiled for _, fwd in entries.values()] == [True]
    _assert_equal(got, _run("occlusion", net, x, Acceleration.plain()), "compiled", 1e-9)
    clear_caches()


@pytest.mark.parametrize("name", ["saliency", "intgrad", "occlusion", "gradcam", "smoothgrad"])
def test_the_default_equals_the_plain_path_in_float32(name: str) -> None:
    net, x = _net(torch.float32), images(2).float()
    plain = _run(name, net, x, Acceleration.plain())
    _assert_equal(_run(name, net, x, Acceleration()), plain, name, 1e-4)


def test_the_accelerators_are_really_used_by_default() -> None:
    """The default takes the fast paths on this model (so the equalities above compare two
    different computations), the plain setting none of them."""
    net, x = _net(), images(2)
    ig = get_method("intgrad", steps=4)
    assert ig(net, x).meta["fused"] is True
    assert ig(net, x, accel=Acceleration.plain()).meta["fused"] is False
    occ = get_method("occlusion", patch=4, stride=4)
    assert occ(net, x).meta["occlusion_path"] == "exact"
    assert occ(net, x, accel=Acceleration.plain()).meta["occlusion_path"] == "naive"


@pytest.mark.parametrize("name", list_methods())
def test_the_plain_path_uses_no_accelerator(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``Acceleration.plain()`` nothing of convlens.accel runs: no folded copy, no lean
    graph, no incremental engine, no compilation, no thread change."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError(f"an accelerator ran on the plain path of {name}")

    monkeypatch.setattr(folded_mod, "_make_copy", refuse)
    monkeypatch.setattr(InputGradientMode, "__enter__", refuse)
    monkeypatch.setattr(perturbation, "IncrementalEngine", refuse)
    monkeypatch.setattr(compiled_mod, "FixedBatchForward", refuse)
    monkeypatch.setattr(torch, "set_num_threads", refuse)
    _run(name, _net(), images(2), Acceleration.plain())


def test_one_switch_on_the_wrapper_per_call_and_in_explain() -> None:
    net, x = _net(), images(2)
    model = wrap_model(net)
    assert model.accel == Acceleration()
    names = ["saliency", "intgrad", "occlusion"]
    options = {"intgrad": {"steps": 4}, "occlusion": {"patch": 4, "stride": 4}}
    fast = explain(model, x, names, options=options)
    per_call = explain(model, x, names, options=options, accel=Acceleration.plain())
    model.accel = Acceleration.plain()
    on_wrapper = explain(model, x, names, options=options)
    assert per_call["intgrad"].meta["fused"] is False
    assert on_wrapper["intgrad"].meta["fused"] is False
    assert on_wrapper["occlusion"].meta["occlusion_path"] == "naive"
    # a call's own setting wins over the wrapper's
    again = explain(model, x, names, options=options, accel=Acceleration())
    assert again["intgrad"].meta["fused"] is True
    for n in names:
        _assert_equal(on_wrapper[n], per_call[n], n, 0.0)
        _assert_equal(fast[n], per_call[n], n, 1e-9)


def test_the_choice_does_not_depend_on_what_ran_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same calls in two orders, in one process, take the same paths and give the same
    results: nothing kept between calls decides."""
    monkeypatch.setattr(settings_mod, "compiler_available", lambda: True)

    def calls(order: list[Acceleration]) -> dict[Acceleration, tuple[Any, ...]]:
        clear_caches()
        net, x = _net(), images(2)
        out = {}
        for accel in order:
            ig = get_method("intgrad", steps=4)(net, x, accel=accel)
            occ = get_method("occlusion", patch=4, stride=4)(net, x, accel=accel)
            out[accel] = (ig.meta["fused"], occ.meta["occlusion_path"], ig.maps, occ.maps)
        return out

    plain, default = Acceleration.plain(), Acceleration()
    first = calls([plain, default, default, plain])
    second = calls([default, plain, plain, default])
    for accel in (plain, default):
        assert first[accel][:2] == second[accel][:2]
        torch.testing.assert_close(first[accel][2], second[accel][2], atol=0, rtol=0)
        torch.testing.assert_close(first[accel][3], second[accel][3], atol=0, rtol=0)
    assert Acceleration().compiles(torch.device("cpu"), 10) is False
    assert Acceleration().compiles(torch.device("cpu"), settings_mod.AUTO_COMPILE_PASSES)


def test_clear_caches_forgets_folded_copies_and_compiled_forwards() -> None:
    net, x = _net(), images(2)
    copy = folded_mod.cached_inference_copy(net, x)
    assert copy is not None and folded_mod.cached_inference_copy(net, x) is copy
    fwd = compiled_mod.compiled_forward(
        net, lambda: copy, batch_size=4, device=x.device, dtype=x.dtype
    )
    kept = compiled_mod.compiled_forward(
        net, lambda: copy, batch_size=4, device=x.device, dtype=x.dtype
    )
    assert kept is fwd
    clear_caches()
    assert folded_mod.cached_inference_copy(net, x) is not copy
    again = compiled_mod.compiled_forward(
        net, lambda: copy, batch_size=4, device=x.device, dtype=x.dtype
    )
    assert again is not fwd
    clear_caches()


def test_threads_are_set_for_the_call_and_restored() -> None:
    seen: list[int] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x.flatten(1)[:, :4]

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    get_method("saliency")(Spy(), images(1, size=4), accel=Acceleration(threads=target))
    assert seen and set(seen) == {target}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "changes", [{"compile": "yes"}, {"threads": 0}, {"threads": 1.5}, {"threads": True}]
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"compile must be|threads must be"):
        Acceleration(**changes)


def test_accel_must_be_an_acceleration() -> None:
    with pytest.raises(InputError, match="accel must be"):
        get_method("saliency")(_net(), images(1), accel="plain")  # type: ignore[arg-type]


NET = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
"""


@pytest.mark.parametrize("command", ["explain", "evaluate", "analyze"])
@pytest.mark.parametrize("plain", [False, True])
def test_the_cli_plain_flag_sets_the_models_accel(
    tmp_path, monkeypatch: pytest.MonkeyPatch, command: str, plain: bool
) -> None:
    import numpy as np
    from PIL import Image

    import convlens.models as models
    from convlens.cli import main

    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "data" / "dog").mkdir(parents=True)
    image = tmp_path / "data" / "dog" / "a.png"
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(image)
    (tmp_path / "labels.txt").write_text("cat\ndog\nmug\n")
    loaded: list[Any] = []
    original = models.load_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(models, "load_model", spy)
    data = str(image if command == "explain" else tmp_path / "data")
    model = ["--model", f"{tmp_path / 'net.py'}:build", "--classes", str(tmp_path / "labels.txt")]
    extra = {"explain": ["--methods", "saliency"], "evaluate": ["--methods", "saliency"]}
    args = [command, data, *model, "--size", "16", "--out", str(tmp_path / "out")]
    args += extra.get(command, []) + (["--plain"] if plain else [])
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code in (0, None)
    (net,) = loaded
    assert net.accel == (Acceleration.plain() if plain else Acceleration())
