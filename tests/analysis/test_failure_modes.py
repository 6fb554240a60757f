"""Failure modes: exact wrong-way decomposition, clustering of planted and of cue-less mistakes,
and the stage inside ``analyze`` (metrics.json, report, resume without recomputing features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.analysis import analyze
from convlens.analysis import failure_modes as fm
from convlens.analysis.failure_modes import (
    FeatureCapture,
    cluster_features,
    distinguishing_channels,
    find_failure_modes,
    wrong_way_contributions,
)
from convlens.analysis.store import Prediction
from convlens.images import load_image
from convlens.models import Preprocess, load_model
from convlens.models.base import ConvlensModel
from tests.helpers.browser import chromium_page
from tests.helpers.models import GapNet, images, seeded, tiny_net_source
from tests.helpers.runs import write_class_images

CLASSES = ("cat", "dog", "coffee mug")
CUE = [5, 6, 7, 8]


# --- the decomposition ---------------------------------------------------------------------------


def test_decomposition_is_exact_in_float64() -> None:
    net = seeded(GapNet(classes=5))
    x = images(6, size=12, seed=3)
    capture = FeatureCapture("fc")
    with torch.no_grad(), capture.once(net):
        logits = net(x)
    assert not net.fc._forward_pre_hooks  # the hook lived for that call only
    feats = capture.value
    assert feats is not None
    with torch.no_grad():  # the captured input is the pooled map, computed independently
        pooled = net.features(x).mean(dim=(2, 3))
    torch.testing.assert_close(feats, pooled.float())
    pooled = pooled.to(torch.float64)
    pred = torch.tensor([0, 1, 2, 3, 4, 0])
    true = torch.tensor([1, 2, 3, 4, 0, 2])
    contrib, term = wrong_way_contributions(pooled, net.fc.weight, net.fc.bias, pred, true)
    margin = logits.gather(1, pred[:, None])[:, 0] - logits.gather(1, true[:, None])[:, 0]
    torch.testing.assert_close(contrib.sum(1) + term, margin, rtol=0, atol=1e-12)
    assert contrib.dtype == torch.float64
    # channel by channel against a plain loop
    w = net.fc.weight.detach()
    for n in range(6):
        for c in range(6):
            expected = (w[pred[n], c] - w[true[n], c]) * pooled[n, c]
            assert float(contrib[n, c]) == pytest.approx(float(expected), abs=1e-15)


def test_capture_finds_the_classifier_in_the_same_pass() -> None:
    net = seeded(GapNet(classes=5))
    x = images(4, size=12, seed=1)
    capture = FeatureCapture()
    with torch.no_grad(), capture.once(net):
        net(x)
    assert capture.fc_name == "fc"
    assert not any(m._forward_hooks for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(capture.value, net.features(x).mean(dim=(2, 3)).float())
    # a last linear layer whose output is not the model's output is not a classifier
    wrapped = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    other = FeatureCapture()
    with torch.no_grad(), other.once(wrapped):
        wrapped(x)
    assert other.fc_name is None and other.value is None


def test_distinguishing_channels_is_cohens_d() -> None:
    rng = np.random.default_rng(0)
    group = rng.normal(size=(20, 4))
    group[:, 2] += 3.0
    reference = rng.normal(size=(30, 4))
    top = distinguishing_channels(group, reference, top=2)
    assert top[0]["channel"] == 2
    g, r = group[:, 2], reference[:, 2]
    pooled = ((19 * g.var(ddof=1)) + (29 * r.var(ddof=1))) / 48
    assert top[0]["effect_size"] == pytest.approx((g.mean() - r.mean()) / np.sqrt(pooled))


# --- clustering on synthetic features ------------------------------------------------------------


def _synthetic(
    seed: int, planted: bool, c: int = 24, k: int = 3
) -> tuple[list[Prediction], dict[str, np.ndarray], set[str], torch.Tensor]:
    """Per class 60 correct images around a class direction; 12 mistakes per class that look
    like their class (random label noise); with ``planted``, 30 more mistakes (of classes 1 and
    2, predicted as class 0) that share a strong response of channels 5-8 (the cue). Weights:
    the classifier reads channels 5-8 as class 0, channel 5 most."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, c)) * 2.0
    centres[:, CUE] = 0.0
    preds: list[Prediction] = []
    feats: dict[str, np.ndarray] = {}
    cue: set[str] = set()

    def add(label: int, pred: int, row: np.ndarray) -> str:
        pid = f"{len(preds):05d}"
        top5 = (pred, *[q for q in range(k) if q != pred])
        preds.append(
            Prediction(pid, f"{pid}.png", label, top5, (0.9, 0.05, 0.05), 1.0, pred == label)
        )
        feats[pid] = np.maximum(row, 0).astype(np.float32)  # post-ReLU
        return pid

    for label in range(k):
        for _ in range(60):
            add(label, label, centres[label] + rng.normal(size=c))
        for _ in range(12):
            add(
                label,
                int(label + 1 + rng.integers(0, k - 1)) % k,
                centres[label] + rng.normal(size=c),
            )
    if planted:
        for n in range(30):
            label = 1 + n % (k - 1)
            row = centres[label] + rng.normal(size=c)
            row[CUE] = 6.0 + rng.normal(size=len(CUE))
            cue.add(add(label, 0, row))
    weight = torch.from_numpy(rng.normal(size=(k, c)) * 0.1)
    weight[0, CUE] = 1.0
    weight[0, 5] = 2.0
    return preds, feats, cue, weight


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("channels", [24, 96])  # 96: projected on 32 principal components
def test_planted_group_is_ranked_first_deterministically(channels: int, seed: int) -> None:
    preds, feats, cue, weight = _synthetic(seed, planted=True, c=channels)
    modes = find_failure_modes(preds, feats, weight, None, CLASSES)
    again = find_failure_modes(preds, feats, weight, None, CLASSES)
    assert [m.summary() for m in modes] == [m.summary() for m in again]
    # the cue's mistakes of both classes may form one cluster or one per true class: those
    # clusters are ranked first, stand out, and hold nearly all and nearly only cue mistakes
    top = [m for m in modes if set(m.errors_ids) & cue]
    assert modes[: len(top)] == top and len(top) <= 2
    found = {i for m in top for i in m.errors_ids}
    assert len(found & cue) >= 0.9 * len(cue)
    assert len(found & cue) >= 0.8 * len(found)
    first = modes[0]
    assert all(m.stands_out for m in top)
    assert not any(m.stands_out for m in modes[len(top) :])
    assert first.push_channels[0]["channel"] == 5
    assert first.distinguishing[0]["channel"] in CUE
    assert first.pairs[0]["pred"] == 0
    assert set(first.representatives) <= set(first.errors_ids)
    # every mistake is in exactly one cluster
    ids = [i for m in modes for i in m.errors_ids]
    assert sorted(ids) == sorted(p.id for p in preds if not p.correct)
    assert sum(m.size for m in modes) <= len(preds)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("channels", [24, 96])
def test_no_cue_raises_no_dominant_cluster(channels: int, seed: int) -> None:
    """Criterion: no cluster with z >= 3 (and >= 3 mistakes) when the mistakes are label noise
    that looks like the rest of its class."""
    preds, feats, _, weight = _synthetic(seed, planted=False, c=channels)
    modes = find_failure_modes(preds, feats, weight, None, CLASSES)
    assert modes
    assert not any(m.stands_out for m in modes), [(m.errors, m.size, m.z) for m in modes]


def test_cluster_labels_are_deterministic_and_degenerate_inputs_are_one_cluster() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    assert (cluster_features(x) == cluster_features(x.copy())).all()
    assert cluster_features(np.ones((10, 8))).tolist() == [0] * 10
    assert cluster_features(x[:3]).tolist() == [0, 0, 0]


# --- inside analyze ------------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "net.py").write_text(tiny_net_source(seed=1))
    (tmp_path / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    data = write_class_images(tmp_path / "data", per_class=8, shape=(36, 36), step=20)
    return {"dir": tmp_path, "data": data, "run": tmp_path / "run"}


def make_model(d: Path) -> ConvlensModel:
    return load_model(
        f"{d / 'net.py'}:build", classes=d / "labels.txt", preprocess=Preprocess(resize=36, crop=32)
    )


def run(model: ConvlensModel, setup: dict[str, Path], **kw: object):  # type: ignore[no-untyped-def]
    kw = {"batch_size": 5, "top_errors": 2, "progress": False, "faithfulness": False, **kw}
    return analyze(model, setup["data"], setup["run"], **kw)  # type: ignore[arg-type]


def test_analyze_writes_failure_modes_that_match_the_model(setup) -> None:
    model = make_model(setup["dir"])
    result = run(model, setup)
    info = json.loads((setup["run"] / "metrics.json").read_text())["failure_modes"]
    wrong = {p.id: p for p in result.predictions if p.correct is False}
    assert wrong, "the tiny model should make mistakes on this data"
    assert info["features_recomputed"] == 0  # all from the prediction pass
    assert sum(c["errors"] for c in info["clusters"]) == len(wrong)
    classes = {p.label for p in wrong.values()}
    right = [p for p in result.predictions if p.correct and p.label in classes]
    assert info["correct_clustered"] == len(right)
    assert info["images_clustered"] == len(right) + len(wrong)
    assert [c["rank"] for c in info["clusters"]] == list(range(1, len(info["clusters"]) + 1))
    scores = [c["score"] for c in info["clusters"]]
    assert scores == sorted(scores, reverse=True)
    # each cluster's mean margin equals the model's own logits on its mistakes
    net = model.net.eval()
    for mode in result.failure_modes:
        x = torch.stack([model.preprocess(load_image(wrong[i].path)) for i in mode.errors_ids])
        with torch.no_grad():
            logits = net(x).double()
        pred = torch.tensor([wrong[i].pred for i in mode.errors_ids])
        true = torch.tensor([int(wrong[i].label or 0) for i in mode.errors_ids])
        margin = logits.gather(1, pred[:, None]) - logits.gather(1, true[:, None])
        assert mode.margin == pytest.approx(float(margin.mean()), abs=1e-4)
    page = result.report.read_text()
    assert 'id="failure-modes"' in page and "Failure modes" in page
    assert f"c{info['clusters'][0]['push_channels'][0]['channel']} " in page


def test_resume_does_not_recompute_features(setup, monkeypatch) -> None:
    first = run(make_model(setup["dir"]), setup)
    store = setup["run"] / "failure_modes" / fm.FEATURES_FILE
    stamp = store.stat().st_mtime_ns

    def forbidden(*args: object, **kw: object) -> None:
        raise AssertionError("features recomputed")

    with monkeypatch.context() as m:
        m.setattr(fm, "features_pass", forbidden)
        from convlens.analysis import run as run_module

        m.setattr(run_module, "features_pass", forbidden)
        again = run(make_model(setup["dir"]), setup)
    assert store.stat().st_mtime_ns == stamp
    assert [m.summary() for m in again.failure_modes] == [m.summary() for m in first.failure_modes]
    # without the file (a run of an older version): one extra pass, the same clusters
    store.unlink()
    third = run(make_model(setup["dir"]), setup)
    assert third.metrics["failure_modes"]["features_recomputed"] > 0
    # the extra pass sees other batches, so the last bits may differ: same groups, same numbers
    assert [sorted(m.errors_ids) for m in third.failure_modes] == [
        sorted(m.errors_ids) for m in first.failure_modes
    ]
    for got, want in zip(third.failure_modes, first.failure_modes, strict=True):
        assert got.margin == pytest.approx(want.margin, abs=1e-4)


@pytest.mark.filterwarnings("ignore::convlens.errors.BlankMapWarning")  # a 2-channel ReLU map
def test_other_heads_use_the_gradient_fallback(setup) -> None:
    (setup["dir"] / "net.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(2 * 30 * 30, 3))\n"
    )
    model = make_model(setup["dir"])
    result = run(model, setup)
    info = json.loads((setup["run"] / "metrics.json").read_text())["failure_modes"]
    assert info["skipped"] is None and info["push_kind"] == "gradient"
    assert result.failure_modes
    assert all(c["push_kind"] == "gradient" for c in info["clusters"])
    # flatten + linear: each channel's contribution has a closed form, computed here by hand
    by_id = {p.id: p for p in result.predictions}
    net = model.net.eval()
    w = net[3].weight.detach().double().view(3, 2, 30, 30)
    for mode in result.failure_modes:
        ps = [by_id[i] for i in mode.errors_ids]
        x = torch.stack([model.preprocess(load_image(p.path)) for p in ps])
        with torch.no_grad():
            a = net[1](net[0](x)).double()
        pred = torch.tensor([p.pred for p in ps])
        true = torch.tensor([int(p.label or 0) for p in ps])
        r = ((w[pred] - w[true]) * a).sum(dim=(2, 3)).mean(0)
        for c in mode.push_channels:
            assert c["contribution"] == pytest.approx(float(r[c["channel"]]), abs=1e-4)
        page = setup["run"] / "report" / "failure_modes" / f"mode-{mode.rank}.html"
        assert "gradient × activation" in page.read_text()


def test_failure_modes_off_computes_nothing(setup) -> None:
    result = run(make_model(setup["dir"]), setup, failure_modes=False)
    assert "failure_modes" not in result.metrics
    assert not (setup["run"] / "failure_modes").exists()
    assert 'id="failure-modes"' not in result.report.read_text()


def test_failure_modes_section_in_headless_chromium(setup) -> None:
    result = run(make_model(setup["dir"]), setup)
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(result.report.as_uri())
        assert page.is_visible("#failure-modes")
        rows = page.eval_on_selector_all("#failure-modes table tr", "els => els.length")
        assert rows == 1 + len(result.failure_modes)
        broken = page.eval_on_selector_all(
            "#failure-modes img",
            "els => els.filter(e => !e.complete || e.naturalWidth == 0).length",
        )
        assert broken == 0
    assert errors == []


def test_cli_failure_modes_flag(setup, capsys) -> None:
    from convlens.cli import main

    d = setup["dir"]
    args = ["analyze", str(setup["data"]), "--model", f"{d / 'net.py'}:build"]
    args += ["--classes", str(d / "labels.txt"), "--size", "32", "--out", str(setup["run"])]
    args += ["--top-errors", "1", "--no-faithfulness"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--no-failure-modes"])
    assert exit_info.value.code == 0
    metrics = setup["run"] / "metrics.json"
    assert "failure_modes" not in json.loads(metrics.read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    clusters = json.loads(metrics.read_text())["failure_modes"]["clusters"]
    assert clusters
    assert f"failure modes: {len(clusters)} groups of mistakes" in capsys.readouterr().out


# --- the gradient fallback -----------------------------------------------------------------------


def test_gradient_fallback_equals_the_exact_decomposition_on_a_gap_head() -> None:
    net = seeded(GapNet(classes=5))
    net.train()  # left as found
    x = images(6, size=12, seed=4)
    pred = torch.tensor([0, 1, 2, 3, 4, 0])
    true = torch.tensor([1, 2, 3, 4, 0, 2])
    contrib, pooled, margin = fm.gradient_contributions(net, x, "relu2", pred, true)
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())
    net.eval()
    with torch.no_grad():
        feats = net.features(x).mean(dim=(2, 3))
        logits = net(x)
    exact, term = wrong_way_contributions(feats, net.fc.weight, net.fc.bias, pred, true)
    torch.testing.assert_close(pooled, feats, rtol=0, atol=1e-12)
    torch.testing.assert_close(contrib, exact, rtol=0, atol=1e-12)
    rows = torch.arange(6)
    torch.testing.assert_close(margin, logits[rows, pred] - logits[rows, true], rtol=0, atol=1e-12)
    torch.testing.assert_close(contrib.sum(1) + term, margin, rtol=0, atol=1e-12)


class _MlpHead(torch.nn.Module):
    """conv -> ReLU -> flatten -> linear -> tanh -> linear: not GAP + linear."""

    def __init__(self, size: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.hidden = torch.nn.Linear(5 * size * size, 7)
        self.out = torch.nn.Linear(7, classes)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(a.flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


def test_gradient_fallback_on_other_heads_against_autograd_and_closed_form() -> None:
    from tests.helpers.models import NoGapNet

    # flatten + linear: dD/dA = (W_pred - W_true) reshaped, so r_c has a closed form, and the
    # head is linear, so the channels plus the bias difference give the margin exactly
    net = seeded(NoGapNet(size=8, classes=3))
    x = images(4, size=8, seed=2)
    pred, true = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    contrib, _, margin = fm.gradient_contributions(net, x, "relu", pred, true)
    with torch.no_grad():
        a = net.relu(net.conv(x))
    w = net.fc.weight.detach().view(3, 2, 8, 8)
    expected = ((w[pred] - w[true]) * a).sum(dim=(2, 3))
    torch.testing.assert_close(contrib, expected, rtol=0, atol=1e-12)
    b = net.fc.bias.detach()
    torch.testing.assert_close(contrib.sum(1) + b[pred] - b[true], margin, rtol=0, atol=1e-12)
    # a non-linear head: each image's gradient by autograd on the feature map itself, no hooks
    mlp = seeded(_MlpHead())
    x = images(3, size=6, seed=5)
    pred, true = torch.tensor([0, 3, 1]), torch.tensor([2, 1, 1])
    contrib, pooled, _ = fm.gradient_contributions(mlp, x, "relu", pred, true)
    for n in range(3):
        a = mlp.relu(mlp.conv(x[n : n + 1])).detach().requires_grad_(True)
        s = mlp.head(a)[0]
        (g,) = torch.autograd.grad(s[pred[n]] - s[true[n]], a)
        torch.testing.assert_close(contrib[n], (g * a).detach()[0].sum(dim=(1, 2)))
        torch.testing.assert_close(pooled[n], a.detach()[0].mean(dim=(1, 2)))
    assert not mlp.training and not any(m._forward_hooks for m in mlp.modules())


# --- the page of each failure mode ---------------------------------------------------------------


def test_each_failure_mode_has_a_page_with_channels_patches_and_maps(setup) -> None:
    from convlens.analysis.failure_pages import PATCHES, SHOWN_CHANNELS

    model = make_model(setup["dir"])
    result = run(model, setup)
    run_dir = setup["run"]
    info = json.loads((run_dir / "metrics.json").read_text())["failure_modes"]
    ev = info["evidence"]
    assert info["push_kind"] == "exact"
    assert all(c["push_kind"] == "exact" for c in info["clusters"])
    assert "seconds" not in info  # metrics.json is the same when a run is resumed
    timing = json.loads((run_dir / "failure_modes" / "timing.json").read_text())
    assert set(timing) == {"clustering", "pages"}
    assert ev["ranked_over"] == len(result.predictions)
    by_id = {p.id: p for p in result.predictions}
    # computed here from the layer's output directly: each channel's top images are those of
    # the highest mean activation over the whole run, each once; each patch's activation is its
    # image's strongest unit, and the patch is centred on that unit's place on the grid
    net = model.net.eval()
    x = torch.stack([model.preprocess(load_image(p.path)) for p in result.predictions])
    with torch.no_grad():
        maps = net[:4](x)  # conv, ReLU, conv, ReLU: the map pooled by the head
    mean = maps.mean(dim=(2, 3))
    row = {p.id: n for n, p in enumerate(result.predictions)}
    stride = 32 / maps.shape[2]
    forwarded = set()
    for mode in result.failure_modes:
        shown = [c["channel"] for c in mode.push_channels[:SHOWN_CHANNELS]]
        shown += [c["channel"] for c in mode.distinguishing[:SHOWN_CHANNELS]]
        for c in shown:
            entry = ev["channels"][str(c)]
            assert (run_dir / entry["image"]).is_file()
            ids = [q["id"] for q in entry["patches"]]
            assert len(set(ids)) == len(ids) == min(PATCHES, len(result.predictions))
            pooled = [q["pooled"] for q in entry["patches"]]
            expected = torch.sort(mean[:, c], descending=True).values[: len(ids)]
            assert pooled == pytest.approx(expected.tolist(), abs=1e-5)
            for q in entry["patches"]:
                a = maps[row[q["id"]], c]
                assert q["value"] == pytest.approx(float(a.max()), abs=1e-5)
                y, x_ = q["unit"]
                assert float(a[y, x_]) == pytest.approx(float(a.max()), abs=1e-6)
                t, left, b, r = q["box"]
                assert t <= (y + 0.5) * stride <= b and left <= (x_ + 0.5) * stride <= r
                assert 0 <= t < b <= 32 and 0 <= left < r <= 32
            forwarded |= set(ids)
        for i in mode.representatives:
            assert set(ev["fires"][i]) == {str(c) for c in shown[: len(mode.push_channels[:3])]}
            kind = ev["maps"][i]["kind"]
            assert kind == ("panel" if i in result.explanations else "gradcam")
            assert (run_dir / ev["maps"][i]["image"]).is_file()
            assert by_id[i].correct is False
            forwarded.add(i)
        page = run_dir / "report" / "failure_modes" / f"mode-{mode.rank}.html"
        text = page.read_text()
        assert f"Failure mode {mode.rank}" in text and "exact" in text
        for p in mode.pairs:
            assert p["true_name"] in text and p["pred_name"] in text
        for c in shown:
            assert f"channels/c{c}.png" in text
    assert ev["forward_images"] == len(forwarded)  # one pass over those images only
    # resumed: the same evidence, from the kept file, without calling the model
    calls: list[int] = []
    handle = model.net.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = run(model, setup).metrics["failure_modes"]["evidence"]
    finally:
        handle.remove()
    assert calls == [] and again == ev
    assert f'href="failure_modes/mode-{result.failure_modes[0].rank}.html"' in (
        result.report.read_text()
    )


def test_failure_mode_pages_in_headless_chromium(setup) -> None:
    from tests.helpers.paths import REPO

    result = run(make_model(setup["dir"]), setup, top_errors=1)  # some maps are Grad-CAM's
    kinds = {m["kind"] for m in result.metrics["failure_modes"]["evidence"]["maps"].values()}
    assert "gradcam" in kinds
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(result.report.as_uri())
        page.click("#failure-modes table tr:nth-child(2) a")
        for mode in result.failure_modes:
            assert page.url.endswith(f"mode-{mode.rank}.html")
            assert page.inner_text("h1").startswith(f"Failure mode {mode.rank}")
            broken = page.eval_on_selector_all(
                "img", "els => els.filter(e => !e.complete || e.naturalWidth == 0).length"
            )
            assert broken == 0
            assert page.eval_on_selector_all("img", "els => els.length") > 0
            hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
            for href in hrefs:
                target = Path(href.split("#")[0].removeprefix("file://"))
                assert target.is_file(), href
            if mode.rank == 1:
                page.screenshot(path=str(artifacts / "failure-mode-page.png"), full_page=True)
            if mode is not result.failure_modes[-1]:
                page.click("text=next failure mode")
    assert errors == []


# --- token layers (vision transformers) ----------------------------------------------------------


def _zoo_model(net: torch.nn.Module) -> ConvlensModel:
    from convlens.models.classes import ClassList

    net.head = torch.nn.Linear(net.head.in_features, len(CLASSES))  # the data set's 3 classes
    return ConvlensModel(
        net=net.eval(), preprocess=Preprocess(resize=36, crop=32), classes=ClassList(CLASSES)
    )


def test_failure_mode_pages_of_torchvision_swin_read_channels_not_rows(setup) -> None:
    """torchvision Swin's head layer is ``permute`` (B, C, h, w), probed as its source, the final
    norm, whose output is (B, h, w, C): the pages map it back to channels. Each patch's value
    and unit equal those of the channel of ``permute(norm(features(x)))`` computed here."""
    from tests.helpers.zoo import torchvision_swin

    torch.manual_seed(0)
    model = _zoo_model(torchvision_swin())
    result = run(model, setup)
    info = result.metrics["failure_modes"]
    assert info["skipped"] is None and result.failure_modes
    ev = info["evidence"]
    assert "skipped" not in ev, ev.get("skipped")  # no note: the pages were made
    assert ev["source"] == "norm@0" and info["layer"] == "permute"
    net = model.net
    x = torch.stack([model.preprocess(load_image(p.path)) for p in result.predictions])
    with torch.no_grad():
        maps = net.permute(net.norm(net.features(x)))
    assert maps.shape[1] > maps.shape[2]  # more channels than rows: rows would be out of range
    row = {p.id: n for n, p in enumerate(result.predictions)}
    checked = 0
    for c, entry in ev["channels"].items():
        for q in entry["patches"]:
            a = maps[row[q["id"]], int(c)]
            assert q["value"] == pytest.approx(float(a.max()), abs=1e-5)
            y, x_ = q["unit"]
            assert float(a[y, x_]) == pytest.approx(float(a.max()), abs=1e-6)
            checked += 1
    assert checked > 0


def test_an_unexpected_error_in_the_pages_is_a_note_not_a_traceback(setup, monkeypatch) -> None:
    from convlens.analysis import failure_pages

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(failure_pages, "_evidence", broken)
    result = run(make_model(setup["dir"]), setup)
    ev = result.metrics["failure_modes"]["evidence"]
    assert "RuntimeError: planted bug" in ev["skipped"] and ev["channels"] == {}
    page = setup["run"] / "report" / "failure_modes" / f"mode-{result.failure_modes[0].rank}.html"
    assert "planted bug" in page.read_text()


def _vit_by_autograd(
    net: torch.nn.Module, x: torch.Tensor, pred: torch.Tensor, true: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x activation over the patch tokens of ``blocks.1.norm1`` (token 0 is the class
    token), by a plain forward hook and autograd: ``(r (N, C), mean over patch tokens (N, C))``."""
    seen: list[torch.Tensor] = []

    def keep(_m: object, _a: object, out: torch.Tensor) -> None:
        out.retain_grad()
        seen.append(out)

    handle = net.blocks[1].norm1.register_forward_hook(keep)
    try:
        logits = net(x)
    finally:
        handle.remove()
    rows = torch.arange(len(x))
    (logits[rows, pred] - logits[rows, true]).sum().backward()
    a, g = seen[0].detach()[:, 1:], seen[0].grad[:, 1:]
    net.zero_grad(set_to_none=True)
    return (g * a).sum(dim=1), a.mean(dim=1)


def test_gradient_fallback_on_a_vit_token_layer_against_autograd() -> None:
    from convlens import LayerError
    from tests.helpers.zoo import timm_vit

    torch.manual_seed(0)
    net = timm_vit().eval()
    x = images(3, size=32, seed=4).float()
    pred, true = torch.tensor([0, 3, 1]), torch.tensor([2, 1, 4])
    contrib, pooled, margin = fm.gradient_contributions(net, x, "blocks.1.norm1", pred, true)
    expected, mean = _vit_by_autograd(net, x, pred, true)
    torch.testing.assert_close(contrib, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pooled, mean)
    with torch.no_grad():
        logits = net(x)
    torch.testing.assert_close(
        margin, logits[torch.arange(3), pred] - logits[torch.arange(3), true]
    )
    assert not any(p.grad is not None for p in net.parameters())
    with pytest.raises(LayerError, match="no \\(N, C, H, W\\) or token output"):
        fm.gradient_contributions(net, x, "head", pred, true)  # (N, classes): no map


def test_analyze_finds_gradient_failure_modes_on_a_vit(setup) -> None:
    from tests.helpers.zoo import timm_vit

    torch.manual_seed(0)
    model = _zoo_model(timm_vit())
    result = run(model, setup)
    info = result.metrics["failure_modes"]
    assert info["skipped"] is None and info["push_kind"] == "gradient"
    assert info["layer"] == "blocks.1.norm1" and result.failure_modes
    assert all(c["push_kind"] == "gradient" for c in info["clusters"])
    assert "skipped" not in info["evidence"], info["evidence"].get("skipped")
    by_id = {p.id: p for p in result.predictions}
    for mode in result.failure_modes:
        ps = [by_id[i] for i in mode.errors_ids]
        x = torch.stack([model.preprocess(load_image(p.path)) for p in ps])
        pred = torch.tensor([p.pred for p in ps])
        true = torch.tensor([int(p.label or 0) for p in ps])
        r, _ = _vit_by_autograd(model.net, x, pred, true)
        for c in mode.push_channels:
            assert c["contribution"] == pytest.approx(float(r.mean(0)[c["channel"]]), abs=1e-4)
