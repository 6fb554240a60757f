"""Error analysis: store contents against an independent count, resume, crash safety, ECE, HTML."""

from __future__ import annotations

import contextlib
import errno
import html
import importlib.util
import json
import math
import os
import re
import sqlite3
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convlens.analysis import AnalysisResult, analyze, expected_calibration_error
from convlens.analysis.stats import calibration_bins
from convlens.errors import BlankMapWarning
from convlens.models import Preprocess, load_model
from convlens.models.base import ConvlensModel
from tests.helpers.browser import chromium_page
from tests.helpers.models import tiny_net_source
from tests.helpers.paths import REPO

NET = tiny_net_source(seed=1)
CLASSES = ("cat", "dog", "coffee mug")


class Counting(nn.Module):
    """Wraps a network; counts forward calls and raises on call ``fail_on`` (1-based)."""

    def __init__(self, net: nn.Module, fail_on: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.calls = 0
        self.fail_on = fail_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.net(x)


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, folder in enumerate(("cat", "dog", "coffee_mug")):
        (data / folder).mkdir(parents=True)
        for k in range(4 if c == 0 else 3):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            pixels[..., c] = 255 - k * 40  # some class signal, so the model is not constant
            Image.fromarray(pixels).save(data / folder / f"img{k}.png")
    (data / "cat" / "broken.png").write_bytes(b"not really a png")
    return {"dir": tmp_path, "data": data, "run": tmp_path / "run"}


def make_model(d: Path) -> ConvlensModel:
    return load_model(
        f"{d / 'net.py'}:build",
        classes=d / "labels.txt",
        preprocess=Preprocess(resize=36, crop=32),
    )


def counting(model: ConvlensModel, fail_on: int | None = None) -> ConvlensModel:
    return ConvlensModel(
        net=Counting(model.net, fail_on),
        preprocess=model.preprocess,
        classes=model.classes,
        name=model.name,
    )


def run(model: ConvlensModel, setup: dict[str, Path], **kw: object) -> AnalysisResult:
    kw = {"batch_size": 4, "top_errors": 3, "progress": False, **kw}
    return analyze(model, setup["data"], setup["run"], **kw)  # type: ignore[arg-type]


def record_inference(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of the inference passes of :func:`analyze` (not the explanation passes)."""
    from convlens.analysis import run as run_module

    sizes: list[int] = []
    original = run_module._launch_batch

    def spy(model, x, labels, copy_stream=None):  # type: ignore[no-untyped-def]
        sizes.append(x.shape[0])
        return original(model, x, labels, copy_stream)

    monkeypatch.setattr(run_module, "_launch_batch", spy)
    return sizes


def rows(db: Path, table: str = "predictions") -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_store_matches_independent_count(setup) -> None:
    model = make_model(setup["dir"])
    result = run(model, setup)
    # independent count, image by image, with plain loops
    labels, preds, top5 = [], [], []
    for c, folder in enumerate(("cat", "dog", "coffee_mug")):
        for f in sorted((setup["data"] / folder).glob("img*.png")):
            with torch.no_grad():
                logits = model.net(model.load_images([f]))[0]
            order = sorted(range(3), key=lambda j: -float(logits[j]))
            labels.append(c)
            preds.append(order[0])
            top5.append(order)
    n = len(labels)
    assert result.metrics["images"] == n == 10
    correct = sum(1 for t, p in zip(labels, preds, strict=True) if t == p)
    assert result.metrics["correct"] == correct
    assert result.metrics["top1"] == pytest.approx(correct / n)
    assert result.metrics["top5"] == pytest.approx(1.0)  # 3 classes: always in the top 5
    per_class = {row["class"]: row for row in result.metrics["per_class"]}
    for c in sorted(set(labels) | set(preds)):
        tp = sum(1 for t, p in zip(labels, preds, strict=True) if t == c and p == c)
        npred = sum(1 for p in preds if p == c)
        ntrue = sum(1 for t in labels if t == c)
        prec = tp / npred if npred else 0.0
        rec = tp / ntrue if ntrue else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        assert per_class[c]["precision"] == pytest.approx(prec)
        assert per_class[c]["recall"] == pytest.approx(rec)
        assert per_class[c]["f1"] == pytest.approx(f1)
        assert per_class[c]["support"] == ntrue
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(labels, preds, strict=True):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    got = {(r["true"], r["pred"]): r["count"] for r in result.metrics["confused_pairs"]}
    assert got == pairs
    counts = [r["count"] for r in result.metrics["confused_pairs"]]
    assert counts == sorted(counts, reverse=True)
    # the table has one row per readable image, the unreadable file is listed
    table = result.table()
    assert len(table) == n and {r["label_name"] for r in table} == set(CLASSES)
    assert [Path(p).name for p, _ in result.failures] == ["broken.png"]
    assert rows(setup["run"] / "predictions.sqlite", "failures") == 1
    for r in table:
        assert r["loss"] == pytest.approx(-math.log(r["probs5"][r["top5"].index(r["label"])]))
    # explanations of the examined mistakes exist
    wrong = [r for r in table if r["correct"] is False]
    assert len(result.explanations) >= min(3, len(wrong))
    for png in result.explanations.values():
        assert png.is_file()


def test_rerun_skips_finished_images_and_cached_explanations(setup, monkeypatch) -> None:
    model = make_model(setup["dir"])
    first = run(model, setup)
    again = counting(model)
    second = run(again, setup)
    assert again.net.calls == 0  # no inference, no explanation recomputed
    (setup["run"] / "explanations" / f"{next(iter(first.explanations))}.png").unlink()
    third = counting(model)
    sizes = record_inference(monkeypatch)
    run(third, setup)
    assert sizes == [] and third.net.calls > 0  # no inference; only that panel is redone
    assert second.metrics == first.metrics
    assert rows(setup["run"] / "predictions.sqlite") == 10


def test_crash_mid_run_then_resume(setup, monkeypatch) -> None:
    model = make_model(setup["dir"])
    crashing = counting(model, fail_on=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashing, setup)
    db = setup["run"] / "predictions.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        done = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
        failed = conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
    assert done + failed == 4  # exactly the first batch
    sizes = record_inference(monkeypatch)
    result = run(model, setup)
    assert rows(db) == 10 and rows(db, "failures") == 1
    assert result.metrics["images"] == 10
    assert sizes == [4, 3] and done == 3  # only the 7 images not yet stored
    reference = run(make_model(setup["dir"]), {**setup, "run": setup["dir"] / "run2"})
    assert result.metrics == reference.metrics


def test_ece_hand_computed() -> None:
    conf = [0.95, 0.96, 0.9, 0.62, 0.55, 0.3]
    correct = [True, False, False, True, True, False]
    # bins of width 1/15: {0.95, 0.96} share (14/15, 1]; the others are alone
    expected = (2 * abs(0.5 - 0.955) + 0.9 + 0.38 + 0.45 + 0.3) / 6
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    bins = calibration_bins(conf, correct)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 6
    assert bins[14]["count"] == 2 and bins[14]["accuracy"] == 0.5
    assert expected_calibration_error([], []) == 0.0
    assert expected_calibration_error([1.0, 0.0], [True, False]) == pytest.approx(0.0)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]


def test_report_links_are_local_and_exist(setup) -> None:
    result = run(make_model(setup["dir"]), setup, top_errors=2)
    run_dir = setup["run"].resolve()
    index = run_dir / "report" / "index.html"
    assert result.report is not None and result.report.resolve() == index
    pages = sorted((run_dir / "report" / "images").glob("*.html"))
    assert len(pages) == len(result.explanations) >= 1
    for page in [index, *pages]:
        text = page.read_text()
        assert "http://" not in text and "https://" not in text
        parser = _Links()
        parser.feed(text)
        assert parser.links
        for link in parser.links:
            target = link.split("#", 1)[0]
            if not target:
                continue
            f = (page.parent / target).resolve()
            assert f.is_file(), f"{page.name} links to missing {link}"
            assert f.is_relative_to(run_dir)
    text = index.read_text()
    assert "broken.png" in text and 'id="images-table"' in text
    for png in ("reliability", "confidence", "confusion"):
        assert (run_dir / "plots" / f"{png}.png").is_file()


def _analyze_args(setup: dict[str, Path]) -> list[str]:
    """``convlens analyze`` arguments for the tiny model of ``setup``."""
    d = setup["dir"]
    model = ["--model", f"{d / 'net.py'}:build", "--classes", str(d / "labels.txt")]
    out = ["--size", "32", "--out", str(setup["run"]), "--top-errors", "1"]
    return ["analyze", str(setup["data"]), *model, *out]


def test_cli_analyze(setup) -> None:
    import typer
    from typer.testing import CliRunner

    from convlens.cli.analyze import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    args = [*_analyze_args(setup), "--batch-size", "5", "--limit", "6"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "6 images" in res.output or "5 images" in res.output
    assert (setup["run"] / "report" / "index.html").is_file()


def test_dataframe_needs_pandas(setup) -> None:
    result = run(make_model(setup["dir"]), setup, top_errors=0)
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas.*table\(\)"):
            result.dataframe()
    else:
        assert len(result.dataframe()) == 10


def test_report_in_headless_chromium(setup) -> None:
    result = run(make_model(setup["dir"]), setup)
    assert result.report is not None
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(result.report.as_uri())
        page.screenshot(path=str(artifacts / "analysis-index.png"), full_page=True)
        page.click("#images-table th[data-key=conf]")
        values = page.eval_on_selector_all(
            "#images-table tbody tr td:nth-child(4)", "els => els.map(e => +e.dataset.value)"
        )
        assert values == sorted(values)
        page.select_option("#filter-status", "wrong")
        shown = int(page.inner_text("#shown-count"))
        assert shown == sum(1 for r in result.table() if r["correct"] is False)
        page.fill("#filter-text", "zzz-no-such-class")
        assert page.inner_text("#shown-count") == "0"
        page.screenshot(path=str(artifacts / "analysis-filtered.png"), full_page=True)
    assert errors == []


def test_method_options_reach_the_methods_and_reset_the_cache(setup, monkeypatch) -> None:
    import convlens.api

    seen: list[dict[str, object]] = []
    original = convlens.api.explain

    def spy(model, x, methods, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend({"name": m.name, **m.options()} for m in methods)
        return original(model, x, methods, *args, **kwargs)

    monkeypatch.setattr(convlens.api, "explain", spy)
    model = make_model(setup["dir"])
    first = run(model, setup, methods={"occlusion": {"patch": 8, "stride": 4}}, top_errors=1)
    assert first.metrics["methods"] == ["gradcam", "occlusion"]
    assert first.metrics["method_options"] == {"occlusion": {"patch": 8, "stride": 4}}
    occ = [s for s in seen if s["name"] == "occlusion"]
    assert occ and all(s["patch"] == 8 and s["stride"] == 4 for s in occ)
    # same options: cached panels reused; other options: panels recomputed
    seen.clear()
    run(
        model,
        setup,
        methods="gradcam,occlusion",
        method_options={"occlusion": {"patch": 8, "stride": 4}},
        top_errors=1,
    )
    assert seen == []
    run(
        model,
        setup,
        methods=["occlusion"],
        method_options={"occlusion": {"patch": 16}},
        top_errors=1,
    )
    assert {s["patch"] for s in seen if s["name"] == "occlusion"} == {16}
    index = (setup["run"] / "report" / "index.html").read_text()
    assert "occlusion (patch=16)" in index


def test_maps_are_saved_and_a_rerun_with_other_methods_leaves_none_stale(setup) -> None:
    """Each examined image's maps are saved (methods in order, predicted and true class, equal
    to an explain() of the image alone); a rerun with other methods removes the panels, maps
    and the Ray engine's list made for the old ones; a missing map file is made again."""
    from convlens import explain

    model = make_model(setup["dir"])
    folder = setup["run"] / "explanations"
    fast = {"faithfulness": False, "failure_modes": False}
    first = run(model, setup, methods="gradcam,saliency", top_errors=3, **fast)
    by_id = {p.id: p for p in first.predictions}
    assert first.explanations
    assert {f.stem for f in (folder / "maps").glob("*.npy")} == set(first.explanations)
    for pid in first.explanations:
        p = by_id[pid]
        want = explain(
            model,
            model.load_images([p.path]),
            ["gradcam", "saliency"],
            target=torch.tensor([[p.pred, p.label]]),
        )
        got = np.load(folder / "maps" / f"{pid}.npy")
        assert got.shape == (2, 2, 32, 32)
        np.testing.assert_allclose(got, torch.cat([e.maps for e in want.values()]), atol=1e-6)
    (folder / "ray.parquet").write_bytes(b"a list of the old explanations")
    second = run(model, setup, methods="gradcam", top_errors=1, **fast)
    assert second.explanations
    assert sorted(folder.glob("*.png")) == sorted(second.explanations.values())
    npys = sorted((folder / "maps").glob("*.npy"))
    assert {f.stem for f in npys} == set(second.explanations)
    assert np.load(npys[0]).shape == (1, 2, 32, 32)  # Grad-CAM's alone
    assert not (folder / "ray.parquet").exists()
    npys[0].unlink()
    again = counting(model)
    run(again, setup, methods="gradcam", top_errors=1, **fast)
    assert again.net.calls > 0 and npys[0].is_file()


@pytest.mark.parametrize(
    ("methods", "options", "message"),
    [
        ({"occlusion": {"patchh": 8}}, None, r"no option 'patchh'.*patch: int.*stride: int"),
        ({"gradcam": {"patch": 8}}, None, r"gradcam takes no options"),
        ({"occlusion": {"patch": -1}}, None, r"occlusion.patch must be a positive integer"),
        ("gradcam,occlsion", None, r"unknown method 'occlsion'.*Did you mean: 'occlusion'"),
        ("gradcam", {"occlusion": {"patch": 8}}, r"'occlusion', which is not among the methods"),
    ],
)
def test_bad_method_options_fail_before_any_work(setup, methods, options, message) -> None:
    from convlens.errors import InputError

    with pytest.raises(InputError, match=message):
        run(make_model(setup["dir"]), setup, methods=methods, method_options=options)
    assert not (setup["run"] / "predictions.sqlite").exists()


def test_parse_method_options_types_and_errors() -> None:
    from convlens.errors import InputError
    from convlens.methods.options import method_options, parse_method_options

    got = parse_method_options(
        [
            "occlusion.patch=16",
            "occlusion.stride = 8",
            "occlusion.fill=blur",
            "occlusion.batch_size=none",
            "scorecam.channel_softmax=yes",
            "tta.scales=1,0.5",
            "rise.p=0.25",
        ]
    )
    assert got == {
        "occlusion": {"patch": 16, "stride": 8, "fill": "blur", "batch_size": None},
        "scorecam": {"channel_softmax": True},
        "tta": {"scales": (1.0, 0.5)},
        "rise": {"p": 0.25},
    }
    assert type(got["occlusion"]["patch"]) is int
    assert parse_method_options(["occlusion.fill=0.5"])["occlusion"]["fill"] == 0.5
    assert set(method_options("occlusion")) >= {"patch", "stride", "fill"}
    for bad, message in [
        ("occlusion.patch=abc", "expected an integer"),
        ("occlusion.fill=red", "expected 'mean' | 'blur' | 'zero' | float"),
        ("occlusion.patch", "METHOD.OPTION=VALUE"),
        ("patch=3", "METHOD.OPTION=VALUE"),
        ("scorecam.channel_softmax=maybe", "expected true or false"),
        ("occlusion.nope=1", "Its options: patch"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            parse_method_options([bad])


def test_cli_method_option(setup, capsys) -> None:
    from convlens.cli import main

    common = [*_analyze_args(setup), "--methods", "occlusion"]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--method-option", "occlusion.patch=8", "-o", "occlusion.stride=4"])
    assert exit_info.value.code == 0
    metrics = json.loads((setup["run"] / "metrics.json").read_text())
    assert metrics["method_options"] == {"occlusion": {"patch": 8, "stride": 4}}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--method-option", "occlusion.strid=4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no option 'strid'" in err and "Did you mean: 'stride'" in err
    assert "Traceback" not in err


def test_image_unreadable_after_prediction_pass_is_skipped(setup, monkeypatch) -> None:
    from convlens.analysis import run as run_module

    model = make_model(setup["dir"])
    gone: list[str] = []
    original = run_module.select_examined

    def damage_after_prediction(predictions, metrics, top_errors):  # type: ignore[no-untyped-def]
        examined = original(predictions, metrics, top_errors)
        # between the prediction pass and the explanation step: delete one, corrupt another
        Path(examined[0].path).unlink()
        Path(examined[1].path).write_bytes(b"\x89PNG truncated")
        gone.extend([examined[0].path, examined[1].path])
        return examined

    monkeypatch.setattr(run_module, "select_examined", damage_after_prediction)
    result = run(model, setup, top_errors=4)
    assert [p for p, _ in result.unexplained] == gone
    assert all(reason for _, reason in result.unexplained)
    ids = {p.id: p.path for p in result.predictions}
    assert len(result.explanations) >= 2
    assert not {ids[i] for i in result.explanations} & set(gone)
    # the predictions still count: 10 readable in the prediction pass, 1 unreadable then
    assert result.metrics["images"] == 10 and result.metrics["failures"] == 1
    assert result.report is not None
    index = result.report.read_text()
    assert 'id="unexplained"' in index
    for path in gone:
        assert html.escape(path) in index


def _recount(db: Path) -> dict[str, object]:
    """Top-1/top-5, per-class figures and ranked confused pairs straight from the SQLite rows."""
    with sqlite3.connect(db) as conn:
        n, right = conn.execute(
            "SELECT COUNT(*), SUM(pred = label) FROM predictions WHERE label IS NOT NULL"
        ).fetchone()
        top5 = sum(
            label in json.loads(t)
            for t, label in conn.execute(
                "SELECT top5, label FROM predictions WHERE label IS NOT NULL"
            )
        )
        tp = dict(
            conn.execute(
                "SELECT label, COUNT(*) FROM predictions WHERE pred = label GROUP BY label"
            )
        )
        support = dict(
            conn.execute(
                "SELECT label, COUNT(*) FROM predictions WHERE label IS NOT NULL GROUP BY label"
            )
        )
        predicted = dict(
            conn.execute(
                "SELECT pred, COUNT(*) FROM predictions WHERE label IS NOT NULL GROUP BY pred"
            )
        )
        pairs = conn.execute(
            "SELECT label, pred, COUNT(*) AS n FROM predictions "
            "WHERE label IS NOT NULL AND pred != label "
            "GROUP BY label, pred ORDER BY n DESC, label, pred"
        ).fetchall()
    per_class = {}
    for c in set(support) | set(predicted):
        prec = tp.get(c, 0) / predicted[c] if c in predicted else 0.0
        rec = tp.get(c, 0) / support[c] if c in support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = (prec, rec, f1, support.get(c, 0))
    return {"top1": right / n, "top5": top5 / n, "per_class": per_class, "pairs": pairs}


def test_metrics_equal_a_recount_from_the_store(tmp_path) -> None:
    # 90 images of 6 labelled classes, an 8-class tiny model: many mistakes and confused pairs
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 8),
    )
    names = [f"class {k}" for k in range(8)]
    model = ConvlensModel(
        net=net, preprocess=Preprocess(resize=None, crop=16), classes=names, name="tiny"
    )
    rng = np.random.default_rng(3)
    lines = ["path,label"]
    for k in range(90):
        pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
        pixels[:, : 4 + 4 * (k % 6)] = (37 * (k % 6)) % 255
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
        lines.append(f"{k}.png,{names[k % 6]}")
    (tmp_path / "set.csv").write_text("\n".join(lines) + "\n")
    # the examples of confused pairs are explained; Grad-CAM of some true classes is empty
    with pytest.warns(BlankMapWarning, match="gradcam returned all-zero maps"):
        result = analyze(
            model,
            tmp_path / "set.csv",
            tmp_path / "run",
            top_errors=0,
            batch_size=16,
            progress=False,
        )
    ref = _recount(tmp_path / "run" / "predictions.sqlite")
    m = result.metrics
    assert m["labelled"] == 90
    assert m["top1"] == pytest.approx(ref["top1"])
    assert m["top5"] == pytest.approx(ref["top5"])
    assert 0 < m["top1"] < 1 and len(ref["pairs"]) >= 2  # the recount is not trivial
    got = {r["class"]: (r["precision"], r["recall"], r["f1"], r["support"]) for r in m["per_class"]}
    assert got.keys() == ref["per_class"].keys()
    for c, row in ref["per_class"].items():
        assert got[c] == pytest.approx(row)
    assert [(r["true"], r["pred"], r["count"]) for r in m["confused_pairs"]] == ref["pairs"]


def _big_result(out: Path, n: int = 50_000, classes: int = 1000) -> AnalysisResult:
    """A synthetic run of ``n`` predictions (no model), for the report's table."""
    from convlens.analysis import Prediction, compute_metrics
    from convlens.analysis.store import image_id

    rng = np.random.default_rng(7)
    names = [f"class {k:04d}" for k in range(classes)]
    predictions = []
    for i in range(n):
        label = None if i % 97 == 0 else int(rng.integers(classes))
        pred = label if label is not None and rng.random() < 0.6 else int(rng.integers(classes))
        others = [c for c in range(5) if c != pred][:4]
        probs = sorted(rng.dirichlet(np.ones(5)).tolist(), reverse=True)
        path = f"/data/img_{i:06d}.jpg"
        predictions.append(
            Prediction(
                id=image_id(path),
                path=path,
                label=label,
                top5=(pred, *others),
                probs5=tuple(probs),
                loss=None if label is None else 1.0,
                correct=None if label is None else pred == label,
            )
        )
    predictions.sort(key=lambda p: p.path)
    return AnalysisResult(
        out_dir=out,
        metrics={**compute_metrics(predictions, names), "model": "synthetic"},
        predictions=predictions,
        failures=[],
        class_names=names,
    )


def test_report_pages_sorts_and_filters_50000_rows(tmp_path) -> None:
    from convlens.analysis.report import write_report

    result = _big_result(tmp_path / "run")
    index = write_report(result, [])
    n = len(result.predictions)
    assert index.stat().st_size < 60 * n  # compact JSON rows, not 50,000 table rows of HTML
    names = result.class_names
    confs = [round(p.confidence, 5) for p in result.predictions]
    wrong = [p for p in result.predictions if p.correct is False]
    query = "class 0042"
    wrong_42 = [p for p in wrong if query in names[p.label] or query in names[p.pred]]  # type: ignore[index]
    errors: list[str] = []

    def column(page, k: int, attr: str = "value") -> list[str]:  # type: ignore[no-untyped-def]
        return page.eval_on_selector_all(
            f"#images-table tbody tr td:nth-child({k})", f"els => els.map(e => e.dataset.{attr})"
        )

    with chromium_page(errors) as page:
        page.goto(index.as_uri())
        assert page.inner_text("#shown-count") == str(n)
        assert page.inner_text("#page-info") == f"page 1 of {-(-n // 100)}"
        assert len(column(page, 4)) == 100
        # sorting covers every row: the first page starts at the global minimum ...
        page.click("#images-table th[data-key=conf]")
        first = [float(v) for v in column(page, 4)]
        assert first == sorted(confs)[:100]
        # ... and the last page ends at the global maximum
        page.click("#page-last")
        assert [float(v) for v in column(page, 4)] == sorted(confs)[-(n % 100 or 100) :]
        page.click("#images-table th[data-key=conf]")  # descending
        assert [float(v) for v in column(page, 4)] == sorted(confs, reverse=True)[:100]
        page.click("#images-table th[data-key=true]")
        true_sorted = sorted("" if p.label is None else names[p.label] for p in result.predictions)
        assert [v if v != "(no label)" else "" for v in column(page, 2)] == true_sorted[:100]
        # filtering covers every row, and keeps the sort
        page.select_option("#filter-status", "wrong")
        assert page.inner_text("#shown-count") == str(len(wrong))
        assert set(column(page, 5)) == {"wrong"}
        page.fill("#filter-text", query)
        assert page.inner_text("#shown-count") == str(len(wrong_42))
        shown = list(zip(column(page, 2), column(page, 3), strict=True))
        assert 0 < len(wrong_42) <= 100
        expected = sorted(
            ((names[p.label], names[p.pred]) for p in wrong_42),  # type: ignore[index]
            key=lambda r: r[0],
        )
        assert shown == expected
        # paging through the filtered rows
        page.fill("#filter-text", "")
        page.select_option("#page-size", "1000")
        assert len(column(page, 4)) == 1000
        one = column(page, 2)
        page.click("#page-next")
        assert page.inner_text("#page-info") == f"page 2 of {-(-len(wrong) // 1000)}"
        two = column(page, 2)
        assert len(two) == 1000 and one[-1] <= two[0]
        page.click("#page-first")
        assert column(page, 2) == one
        page.screenshot(path=str(tmp_path / "big.png"))
    assert errors == []


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_two_targets_in_one_call_equal_two_calls(setup, method) -> None:
    from convlens.analysis.run import _one_target
    from convlens.api import explain

    model = make_model(setup["dir"])
    files = sorted(setup["data"].glob("*/img*.png"))[:3]
    x = model.load_images(files)
    pred, true = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    # Grad-CAM finds no evidence for one of these classes in one image: an empty map, flagged
    blank = pytest.warns(BlankMapWarning) if method == "gradcam" else contextlib.nullcontext()
    with blank:
        both = explain(model, x, [method], target=torch.stack([pred, true], dim=1))[method]
        for k, target in enumerate((pred, true)):
            alone = explain(model, x, [method], target=target)[method]
            part = _one_target(both, k)
            assert torch.equal(part.targets, alone.targets)
            torch.testing.assert_close(part.maps, alone.maps, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(part.probs, alone.probs)


def test_crash_while_reading_the_next_batch_keeps_the_previous_one(setup, monkeypatch) -> None:
    from convlens.analysis import run as run_module

    original = run_module._ImageSet.__getitem__

    def flaky(self, i):  # type: ignore[no-untyped-def]
        if i == 5:  # in the second batch of 4
            raise RuntimeError("disk gone")
        return original(self, i)

    monkeypatch.setattr(run_module._ImageSet, "__getitem__", flaky)
    with pytest.raises(RuntimeError, match="disk gone"):
        run(make_model(setup["dir"]), setup)
    db = setup["run"] / "predictions.sqlite"
    assert rows(db) + rows(db, "failures") == 4  # the first batch, launched before the crash


def test_keep_freed_memory_sets_the_glibc_thresholds() -> None:
    import platform

    from convlens.accel.allocator import keep_freed_memory

    for bad in (0, 2**31):
        with pytest.raises(ValueError, match="nbytes"):
            keep_freed_memory(bad)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc  # mallopt accepted both values where glibc is used


def test_preprocess_numpy_path_equals_the_torch_path() -> None:
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 255, (75, 101, 3), dtype=np.uint8))
    for pre in (
        Preprocess(resize=36, crop=32),
        Preprocess(resize=None, crop=40, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ):
        fast = pre(image)
        reference = pre.normalize(pre.to_unit(image))
        assert fast.dtype == torch.float32 and fast.is_contiguous()
        assert torch.equal(fast, reference)  # bit for bit


def test_report_table_survives_a_nan_confidence(tmp_path) -> None:
    """A model that outputs NaN gives a NaN confidence: the table's JSON must stay parseable."""
    import dataclasses

    from convlens.analysis.report import write_report

    result = _big_result(tmp_path / "run", n=30, classes=5)
    bad = result.predictions[3]
    result.predictions[3] = dataclasses.replace(bad, probs5=(float("nan"),) * 5)
    index = write_report(result, [])
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(index.as_uri())
        assert page.inner_text("#shown-count") == "30"
        cells = page.eval_on_selector_all(
            "#images-table tbody tr td:nth-child(4)", "els => els.map(e => e.textContent)"
        )
        assert "nan" in cells
        page.click("#images-table th[data-key=conf]")  # sorting with a null confidence
        assert page.inner_text("#shown-count") == "30"
    assert not errors, errors


def test_cache_stamp_tells_large_tensor_options_apart() -> None:
    """Explanations are cached per method options; ``repr`` abbreviates large tensors, so two
    different baselines must still give different stamps."""
    from convlens.analysis.run import _jsonable

    a = torch.zeros(1, 3, 64, 64)
    b = a.clone()
    b[0, 1, 30, 30] = 1.0
    assert _jsonable({"baseline": a}) != _jsonable({"baseline": b})
    assert _jsonable({"baseline": a}) == _jsonable({"baseline": a.clone()})
    assert _jsonable({"x": torch.tensor(2.0), "m": True, "s": "a"})["s"] == "a"
    json.dumps(_jsonable({"x": torch.tensor(2.0), "flags": torch.ones(3, dtype=torch.bool)}))


class LazyGridNet(nn.Module):
    """Caches a coordinate grid on its first forward (as some models do), then adds it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.grid: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None or self.grid.shape[-2:] != x.shape[-2:]:
            self.grid = torch.linspace(0, 1, x.shape[-1]).expand(1, 1, *x.shape[-2:]).clone()
        h = torch.relu(self.conv(x) * (1 + self.grid))
        return self.fc(h.mean(dim=(2, 3)))


def test_lazy_model_state_from_the_prediction_pass_allows_gradients(tmp_path) -> None:
    """State created during the prediction pass must not be an inference tensor, or the
    gradient explanations of the mistakes fail."""
    torch.manual_seed(0)
    net = LazyGridNet().eval()
    folder = tmp_path / "data"
    for c in ("a", "b", "c"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(
                np.random.default_rng(i + ord(c)).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            ).save(folder / c / f"{i}.png")
    from convlens.models.classes import ClassList

    model = ConvlensModel(
        net=net,
        preprocess=Preprocess(resize=36, crop=32),
        classes=ClassList(["a", "b", "c"]),
        name="lazy",
    )
    res = analyze(model, folder, tmp_path / "run", methods="saliency", progress=False)
    assert net.grid is not None and not net.grid.is_inference()
    assert len(res.predictions) == 9
    assert list((tmp_path / "run" / "explanations").glob("*.png"))  # saliency panels were made


# --- faithfulness of the explained mistakes' maps ------------------------------------------


def sharp_model(d: Path) -> ConvlensModel:
    """The tiny model with 20x larger logits: its probabilities move as pixels are deleted, so
    the deletion/insertion areas differ between images and maps."""
    model = make_model(d)
    with torch.no_grad():
        model.net[-1].weight.mul_(20)
    return model


def count_scoring(monkeypatch: pytest.MonkeyPatch, fail_on: int | None = None) -> list[int]:
    """Batch sizes of the calls of ``deletion_insertion_many`` made by :func:`analyze`; the call
    ``fail_on`` (1-based) raises."""
    import convlens.metrics

    sizes: list[int] = []
    original = convlens.metrics.deletion_insertion_many

    def spy(model, x, maps, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(x.shape[0])
        if fail_on is not None and len(sizes) == fail_on:
            raise RuntimeError("simulated crash while scoring")
        return original(model, x, maps, *args, **kwargs)

    monkeypatch.setattr(convlens.metrics, "deletion_insertion_many", spy)
    return sizes


def stored_scores(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "explanations" / "faithfulness.json").read_text())["images"]


def test_faithfulness_scores_equal_an_independent_call(setup) -> None:
    from convlens.analysis.faithfulness import random_maps
    from convlens.api import explain
    from convlens.metrics import deletion_insertion_many

    model = sharp_model(setup["dir"])
    result = run(model, setup, methods="gradcam,saliency")
    assert len(result.explanations) >= 4  # more than one chunk of 4 (3 errors + pair examples)
    assert result.faithfulness.keys() == result.explanations.keys()
    assert stored_scores(setup["run"]) == result.faithfulness
    by_id = {p.id: p for p in result.predictions}
    aucs = set()
    for pid, scores in result.faithfulness.items():
        p = by_id[pid]
        x = model.load_images([p.path])
        target = torch.tensor([p.pred])  # the predicted class, not the true one
        maps = {
            m: e.maps[:, 0] for m, e in explain(model, x, ["gradcam", "saliency"], target).items()
        }
        maps["(random)"] = random_maps([pid], (32, 32))
        curves = deletion_insertion_many(model, x, maps, targets=target)
        assert scores.keys() == maps.keys()
        for m, c in curves.items():
            # one image alone here, a chunk of up to 4 in analyze: equal to float rounding
            assert scores[m]["deletion_auc"] == pytest.approx(float(c.deletion_auc[0]), abs=1e-4)
            assert scores[m]["insertion_auc"] == pytest.approx(float(c.insertion_auc[0]), abs=1e-4)
            aucs.add(round(scores[m]["deletion_auc"], 3))
    assert len(aucs) > 3  # the check can tell images and maps apart
    # the summary in metrics.json, recounted from the per-image scores
    summary = json.loads((setup["run"] / "metrics.json").read_text())["faithfulness"]
    assert summary == result.metrics["faithfulness"]
    rows = list(result.faithfulness.values())
    assert summary["images"] == len(rows)
    assert list(summary["methods"]) == ["gradcam", "saliency", "(random)"]
    for m, got in summary["methods"].items():
        assert got["images"] == len(rows)
        assert got["deletion_auc"] == pytest.approx(np.mean([r[m]["deletion_auc"] for r in rows]))
        assert got["insertion_auc"] == pytest.approx(np.mean([r[m]["insertion_auc"] for r in rows]))
        if m == "(random)":
            assert got["beats_random_deletion"] is None and got["beats_random_insertion"] is None
            continue
        beats_del = [r[m]["deletion_auc"] < r["(random)"]["deletion_auc"] for r in rows]
        beats_ins = [r[m]["insertion_auc"] > r["(random)"]["insertion_auc"] for r in rows]
        assert got["beats_random_deletion"] == pytest.approx(np.mean(beats_del))
        assert got["beats_random_insertion"] == pytest.approx(np.mean(beats_ins))


def test_faithfulness_is_cached_resumed_and_reset(setup, monkeypatch) -> None:
    model = sharp_model(setup["dir"])
    run_dir = setup["run"]
    cache = run_dir / "explanations" / "faithfulness.json"
    # a run interrupted while scoring its second chunk keeps the first chunk's scores
    sizes = count_scoring(monkeypatch, fail_on=2)
    with pytest.raises(RuntimeError, match="simulated crash while scoring"):
        run(model, setup)
    first_chunk = stored_scores(run_dir)
    assert len(first_chunk) == sizes[0] == 4
    sizes = count_scoring(monkeypatch)
    result = run(model, setup)
    n = len(result.explanations)
    assert sum(sizes) == n - 4  # only the images not scored yet
    assert all(stored_scores(run_dir)[k] == v for k, v in first_chunk.items())
    assert result.faithfulness.keys() == result.explanations.keys()
    # a rerun computes nothing
    sizes = count_scoring(monkeypatch)
    again = run(model, setup)
    assert sizes == [] and again.faithfulness == result.faithfulness
    assert again.metrics == result.metrics
    # a run folder from before the scores: panels there, no faithfulness.json -> scored,
    # the panels are not redrawn
    stamps = {p: p.stat().st_mtime_ns for p in result.explanations.values()}
    cache.unlink()
    sizes = count_scoring(monkeypatch)
    redone = run(model, setup)
    assert sum(sizes) == n
    assert {p: p.stat().st_mtime_ns for p in redone.explanations.values()} == stamps
    for pid, scores in redone.faithfulness.items():
        for m, s in scores.items():
            assert s == pytest.approx(result.faithfulness[pid][m], abs=1e-4)
    # other methods: the scores are reset with the panels
    sizes = count_scoring(monkeypatch)
    other = run(model, setup, methods="gradcam,saliency")
    assert sum(sizes) == n
    assert {m for s in stored_scores(run_dir).values() for m in s} == {
        "gradcam",
        "saliency",
        "(random)",
    }
    assert list(other.metrics["faithfulness"]["methods"]) == ["gradcam", "saliency", "(random)"]


def test_no_faithfulness_computes_nothing(setup, monkeypatch) -> None:
    sizes = count_scoring(monkeypatch)
    result = run(sharp_model(setup["dir"]), setup, faithfulness=False)
    assert sizes == [] and result.explanations
    assert result.faithfulness == {} and "faithfulness" not in result.metrics
    assert "faithfulness" not in json.loads((setup["run"] / "metrics.json").read_text())
    assert not (setup["run"] / "explanations" / "faithfulness.json").exists()
    assert result.report is not None
    for page in [result.report, *(setup["run"] / "report" / "images").glob("*.html")]:
        text = page.read_text()
        assert 'id="faithfulness"' not in text and "deletion AUC" not in text


class _Tables(HTMLParser):
    """The text of every table cell, as ``tables[k][row][cell]``, and the text of the headings."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h1", "h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data: str) -> None:
        for part in (self._cell, self._heading):
            if part is not None:
                part.append(data)


def parse_tables(text: str) -> _Tables:
    parser = _Tables()
    parser.feed(text)
    return parser


def test_report_shows_the_faithfulness_numbers(setup) -> None:
    result = run(sharp_model(setup["dir"]), setup, methods="gradcam,saliency")
    assert result.report is not None
    index = result.report.read_text()
    section = index[index.index('<section id="faithfulness">') :]
    section = section[: section.index("</section>")]
    parsed = parse_tables(section)
    n = len(result.faithfulness)
    assert parsed.headings == [
        f"How faithful are the maps? (deletion/insertion on the {n} explained mistakes, "
        "predicted class)"
    ]
    [table] = parsed.tables
    assert table[0][:3] == ["method", "mean deletion AUC ↓", "mean insertion AUC ↑"]
    summary = result.metrics["faithfulness"]["methods"]
    shown = {row[0]: row[1:] for row in table[1:]}
    assert list(shown) == ["gradcam", "saliency", "(random map)"]
    for name, cells in shown.items():
        row = summary["(random)" if name == "(random map)" else name]
        assert float(cells[0]) == pytest.approx(row["deletion_auc"], abs=5e-4)
        assert float(cells[1]) == pytest.approx(row["insertion_auc"], abs=5e-4)
        for cell, share in zip(
            cells[2:4], (row["beats_random_deletion"], row["beats_random_insertion"]), strict=True
        ):
            if share is None:
                assert cell == "n/a"
            else:
                assert float(cell.rstrip("%")) == pytest.approx(100 * share, abs=0.05)
        assert int(cells[4]) == n
    assert 'href="#faithfulness"' in index
    # each examined image's page has its own numbers
    for pid, scores in result.faithfulness.items():
        page = (setup["run"] / "report" / "images" / f"{pid}.html").read_text()
        parsed = parse_tables(page[page.index('<h2 id="faithfulness"') :])
        pred = result.class_names[next(p.pred for p in result.predictions if p.id == pid)]
        assert parsed.headings == [f"Faithfulness of the maps for the predicted class ({pred})"]
        tables = parsed.tables
        got = {row[0]: row[1:] for row in tables[0][1:]}
        assert list(got) == ["gradcam", "saliency", "(random map)"]
        for name, (d, i) in got.items():
            s = scores["(random)" if name == "(random map)" else name]
            assert float(d) == pytest.approx(s["deletion_auc"], abs=5e-4)
            assert float(i) == pytest.approx(s["insertion_auc"], abs=5e-4)


def test_cli_faithfulness_flag(setup) -> None:
    from convlens.cli import main

    metrics = setup["run"] / "metrics.json"
    cache = setup["run"] / "explanations" / "faithfulness.json"
    with pytest.raises(SystemExit) as exit_info:
        main([*_analyze_args(setup), "--no-faithfulness"])
    assert exit_info.value.code == 0
    assert "faithfulness" not in json.loads(metrics.read_text()) and not cache.exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*_analyze_args(setup), "--faithfulness"])
    assert exit_info.value.code == 0
    summary = json.loads(metrics.read_text())["faithfulness"]
    assert summary["images"] >= 1 and set(summary["methods"]) == {"gradcam", "(random)"}
    assert cache.is_file()


# --- nothing lost: killed writes, full disks, a corrupt store, non-finite model outputs ---


def leftovers(run_dir: Path) -> list[Path]:
    """Empty files and temporary files of unfinished writes in a run folder."""
    return [
        f
        for f in run_dir.rglob("*")
        if f.is_file() and (f.stat().st_size == 0 or ".tmp-" in f.name)
    ]


def assert_report_links_complete(run_dir: Path) -> None:
    """Every local link and image of the report points at a whole, readable file."""
    from convlens.atomic import is_complete

    for page in [run_dir / "report" / "index.html", *(run_dir / "report" / "images").glob("*")]:
        parser = _Links()
        parser.feed(page.read_text())
        for link in parser.links:
            target = link.split("#", 1)[0]
            if not target:
                continue
            f = (page.parent / target).resolve()
            assert is_complete(f), f"{page.name} links to incomplete {link}"
            if f.suffix in (".png", ".jpg"):
                with Image.open(f) as im:
                    im.load()


KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    from matplotlib.figure import Figure
    from PIL import Image

    from convlens.analysis import analyze
    from convlens.models import Preprocess, load_model

    folder, kind, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    calls = [0]

    def dying(real):
        def write(self, fp, *args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:  # killed half way through writing this file
                with open(fp, "wb") as fh:
                    fh.write(b"\\x89PNG\\r\\n\\x1a\\n half")
                    fh.flush()
                os._exit(9)
            return real(self, fp, *args, **kwargs)
        return write

    if kind == "thumbnail":
        Image.Image.save = dying(Image.Image.save)
    else:
        Figure.savefig = dying(Figure.savefig)
    model = load_model(
        f"{folder / 'net.py'}:build",
        classes=folder / "labels.txt",
        preprocess=Preprocess(resize=36, crop=32),
    )
    analyze(model, folder / "data", folder / "run", batch_size=4, top_errors=3, progress=False)
    """
)


def test_killed_during_artifact_writes_then_resume(setup) -> None:
    """A run killed while writing a thumbnail, then one killed while writing a plot or panel;
    the resumed run leaves no empty or partial file and its report links only whole files."""
    import subprocess
    import sys

    from convlens.atomic import is_complete

    script = setup["dir"] / "kill.py"
    script.write_text(KILL_DURING_WRITE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind, nth in (("thumbnail", 6), ("figure", 4)):
        args = [sys.executable, str(script), str(setup["dir"]), kind, str(nth)]
        res = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        assert res.returncode == 9, res.stderr
    run_dir = setup["run"]
    assert leftovers(run_dir)  # the killed writes' temporary files
    assert not (run_dir / "report").exists()
    # files an older version wrote in place and was killed at: empty, or cut short
    thumbs = sorted((run_dir / "thumbs").glob("*.jpg"))
    thumbs[0].write_bytes(b"")
    thumbs[1].write_bytes(thumbs[1].read_bytes()[:50])
    result = run(make_model(setup["dir"]), setup)
    assert leftovers(run_dir) == []
    assert all(is_complete(t) for t in (run_dir / "thumbs").glob("*.jpg"))
    assert len(list((run_dir / "thumbs").glob("*.jpg"))) == 10
    assert all(is_complete(p) for p in result.explanations.values())
    assert_report_links_complete(run_dir)
    reference = run(make_model(setup["dir"]), {**setup, "run": setup["dir"] / "run2"})
    assert result.metrics == reference.metrics
    assert result.explanations.keys() == reference.explanations.keys()


def small_pages(monkeypatch: pytest.MonkeyPatch, spare: int) -> None:
    """Simulate a disk with room for ``spare`` more database pages of 512 bytes."""
    from convlens.analysis import store as store_module

    connect = sqlite3.connect
    init = store_module.PredictionStore.__init__

    def small(*args, **kwargs):  # type: ignore[no-untyped-def]
        conn = connect(*args, **kwargs)
        conn.execute("PRAGMA page_size=512")  # before the tables exist: more, smaller pages
        return conn

    def limited(self, path):  # type: ignore[no-untyped-def]
        init(self, path)
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        self._conn.execute(f"PRAGMA max_page_count={pages + spare}")

    monkeypatch.setattr(store_module.sqlite3, "connect", small)
    monkeypatch.setattr(store_module.PredictionStore, "__init__", limited)


def test_full_disk_in_the_store_is_clean_and_resumable(setup, monkeypatch, capsys) -> None:
    from convlens.cli import main
    from convlens.errors import OutputError

    small_pages(monkeypatch, spare=3)
    with pytest.raises(OutputError) as info:
        run(make_model(setup["dir"]), setup)
    db = setup["run"] / "predictions.sqlite"
    message = str(info.value)
    assert message.startswith(f"cannot write {db}: database or disk is full")
    assert "free some space and run again to resume" in message
    assert not (setup["run"] / "metrics.json").exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done, failed = rows(db), rows(db, "failures")
    assert (done + failed) % 4 == 0 and 0 < done + failed < 11  # whole batches only
    # the command line says so on one line
    with pytest.raises(SystemExit) as exit_info:
        main(_analyze_args(setup))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # beside the progress bar
    assert len(lines) == 1 and "database or disk is full" in lines[0]
    assert "Traceback" not in err
    # space freed: the rerun resumes and gives what an uninterrupted run gives
    monkeypatch.undo()
    sizes = record_inference(monkeypatch)
    result = run(make_model(setup["dir"]), setup)
    assert sum(sizes) == 11 - done - failed
    reference = run(make_model(setup["dir"]), {**setup, "run": setup["dir"] / "run2"})
    assert result.metrics == reference.metrics
    assert rows(db) == 10 and leftovers(setup["run"]) == []


@pytest.mark.parametrize("victim", ["metrics.json", "explanations/", "report/index.html"])
def test_full_disk_for_an_artifact_is_clean_and_resumable(setup, monkeypatch, victim) -> None:
    from convlens import atomic
    from convlens.errors import OutputError

    real = atomic._commit

    def full(tmp: Path, path: Path, durable: bool) -> None:  # the disk fills up at this file
        if (victim.endswith("/") and tmp.parent.name == victim[:-1]) or path.name in victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tmp, path, durable)

    monkeypatch.setattr(atomic, "_commit", full)
    with pytest.raises(OutputError, match=r"No space left on device; free some space") as info:
        run(make_model(setup["dir"]), setup)
    assert str(setup["run"]) in str(info.value)
    assert leftovers(setup["run"]) == []  # no empty metrics.json, no half file
    if victim == "metrics.json":
        assert not (setup["run"] / "metrics.json").exists()
    monkeypatch.undo()
    sizes = record_inference(monkeypatch)
    result = run(make_model(setup["dir"]), setup)
    assert sizes == []  # every prediction was kept
    reference = run(make_model(setup["dir"]), {**setup, "run": setup["dir"] / "run2"})
    assert result.metrics == reference.metrics
    assert_report_links_complete(setup["run"])


def test_a_corrupt_store_is_a_clean_error(setup) -> None:
    from convlens.errors import ConvlensError

    setup["run"].mkdir()
    (setup["run"] / "predictions.sqlite").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ConvlensError, match=r"is not a readable convlens store.*--out"):
        run(make_model(setup["dir"]), setup)


class NonFinite(nn.Module):
    """The tiny net, with NaN outputs for greenish images and an infinite one for bluish."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        colour = x.mean((2, 3)).argmax(1)
        logits = torch.where((colour == 1)[:, None], torch.nan, logits)
        inf = torch.zeros_like(logits)
        inf[:, 0] = torch.inf
        return torch.where((colour == 2)[:, None], inf, logits)


def test_non_finite_outputs_are_failures_not_a_crash(setup, monkeypatch) -> None:
    from convlens.analysis.run import NOT_FINITE

    model = make_model(setup["dir"])
    with torch.no_grad():
        x = model.load_images(sorted(setup["data"].glob("*/img*.png")))
        colour = x.mean((2, 3)).argmax(1)
    assert (colour == 1).any() and (colour == 2).any() and (colour == 0).any()
    broken = ConvlensModel(
        net=NonFinite(model.net),
        preprocess=model.preprocess,
        classes=model.classes,
        name=model.name,
    )
    result = run(broken, setup)
    reasons = dict(result.failures)
    assert sum(r == NOT_FINITE for r in reasons.values()) == int((colour != 0).sum())
    assert result.metrics["images"] == int((colour == 0).sum())
    assert result.metrics["failures"] == len(result.failures) == 1 + int((colour != 0).sum())
    index = (setup["run"] / "report" / "index.html").read_text()
    assert html.escape(NOT_FINITE) in index
    assert_report_links_complete(setup["run"])
    # Fixed weights, rerun into the same folder: those images are predicted now, the others
    # are not predicted again, and no image is both a prediction and a failure.
    sizes = record_inference(monkeypatch)
    fixed = run(model, setup)
    assert sum(sizes) == int((colour != 0).sum())
    assert fixed.metrics["images"] == len(colour)
    assert fixed.metrics["failures"] == len(fixed.failures) == 1


@pytest.mark.parametrize(
    ("sqlite_message", "kind", "advice"),
    [
        ("database or disk is full", "OutputError", "free some space and run again to resume"),
        ("disk I/O error", "OutputError", "check the disk and run again to resume"),
        ("database is locked", "RunFolderError", "wait for it to finish or choose another --out"),
        ("attempt to write a readonly database", "OutputError", "permissions"),
        ("file is not a database", "RunFolderError", "move it away to start over"),
    ],
)
def test_store_errors_name_the_file_and_what_to_do(tmp_path, sqlite_message, kind, advice) -> None:
    from convlens.analysis.store import store_error

    path = tmp_path / "run" / "predictions.sqlite"
    error = store_error(path, sqlite3.OperationalError(sqlite_message))
    assert type(error).__name__ == kind
    assert str(path) in str(error) and sqlite_message in str(error) and advice in str(error)


# --------------------------------------------------------------------------------------------
# User text in the report: escaped in the page and in the script data

HOSTILE_CLASSES = (
    "</script><script>window.pwned=1</script>",
    "mug \"q\" 'a' & {{ 7*7 }} <b>x</b>",
    "{% raw %}<img src=x onerror=window.pwned=2>",
)
HOSTILE_FILES = (
    "<script>window.pwned=3<\\script>.png",
    "q\"'&{{7*7}}.png",
    "<img src=x onerror=window.pwned=4>.png",
    "<!--{#.png",
)


class _Elements(HTMLParser):
    """Every element of a page (tag, attributes) and the text of its script elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data


def hostile_run(setup: dict[str, Path]) -> AnalysisResult:
    """An analysis whose class names and file names are HTML, script and template syntax."""
    d = setup["dir"]
    (d / "labels.txt").write_text("\n".join(HOSTILE_CLASSES) + "\n")
    images = d / "hostile"
    images.mkdir()
    rng = np.random.default_rng(3)
    lines = ["path,label"]
    for k, name in enumerate(HOSTILE_FILES * 2):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        pixels[..., k % 3] = 250
        Image.fromarray(pixels).save(images / f"{k}{name}")
        path = str(images / f"{k}{name}").replace('"', '""')
        lines.append(f'"{path}",{k % 3}')
    csv = d / "hostile.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return analyze(make_model(d), csv, setup["run"], batch_size=4, top_errors=6, progress=False)


def test_report_escapes_user_text_in_pages_and_table_data(setup) -> None:
    result = hostile_run(setup)
    assert result.report is not None and len(result.explanations) >= 2
    index = result.report.read_text(encoding="utf-8")
    page = _Elements()
    page.feed(index)
    tags = [tag for tag, _ in page.elements]
    # no element from the data set: the page's own two scripts (data, code), no <b> or onerror
    assert tags.count("script") == 2 and "b" not in tags
    assert not any("onerror" in attrs for _, attrs in page.elements)
    data_text, code = page.scripts
    assert not re.search(r"[<>&']", data_text)  # tojson escapes them all
    data = json.loads(data_text)
    assert set(data["names"]) == set(HOSTILE_CLASSES)
    shown = {row[0] for row in data["rows"]}
    assert shown == {f"{k}{name}" for k, name in enumerate(HOSTILE_FILES * 2)}
    assert "JSON.parse" in code
    # the class names are shown as written, template syntax included
    per_class = parse_tables(index[index.index('<section id="classes">') :]).tables[0]
    assert [row[0] for row in per_class[1:]] == list(HOSTILE_CLASSES)
    for path in sorted((setup["run"] / "report" / "images").glob("*.html")):
        image_page = _Elements()
        image_page.feed(path.read_text(encoding="utf-8"))
        assert [tag for tag, _ in image_page.elements].count("script") == 0
        assert not any("onerror" in attrs for _, attrs in image_page.elements)
        heading = parse_tables(path.read_text(encoding="utf-8")).headings[0]
        assert heading in shown


def test_report_with_hostile_names_in_headless_chromium(setup) -> None:
    result = hostile_run(setup)
    assert result.report is not None
    errors: list[str] = []
    with chromium_page(errors) as page:
        page.on("dialog", lambda d: errors.append(f"dialog {d.message}"))
        page.goto(result.report.as_uri())
        assert page.evaluate("window.pwned") is None
        assert page.eval_on_selector_all("script", "els => els.length") == 2
        assert page.eval_on_selector_all("b, [onerror]", "els => els.length") == 0
        cells = page.eval_on_selector_all(
            "#images-table tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)"
        )
        assert sorted(cells) == sorted(HOSTILE_CLASSES[k % 3] for k in range(8))
        files = page.eval_on_selector_all(
            "#images-table tbody tr td:first-child img", "els => els.map(e => e.alt)"
        )
        assert sorted(files) == sorted(f"{k}{name}" for k, name in enumerate(HOSTILE_FILES * 2))
        page.fill("#filter-text", "{{ 7*7 }}")
        assert int(page.inner_text("#shown-count")) >= 1
        for link in page.eval_on_selector_all(".card a", "els => els.map(e => e.href)"):
            page.goto(link)
            assert page.evaluate("window.pwned") is None
            assert page.eval_on_selector_all("b, [onerror], script", "els => els.length") == 0
    assert errors == []


def test_report_shows_undecodable_file_name_bytes_escaped(setup) -> None:
    data = setup["dir"] / "flat"
    data.mkdir()
    name = os.fsdecode(b"bad\xffbyte.png")
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(data / name)
    Image.fromarray(np.full((40, 48, 3), 20, np.uint8)).save(data / "plain.png")
    result = analyze(make_model(setup["dir"]), data, setup["run"], progress=False)
    assert result.report is not None
    page = _Elements()
    page.feed(result.report.read_text(encoding="utf-8"))
    rows = json.loads(page.scripts[0])["rows"]
    assert sorted(row[0] for row in rows) == ["bad\\xffbyte.png", "plain.png"]


def test_a_rerun_opens_only_thumbnails_not_recorded_complete(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thumbnails found complete are recorded in the store with their size and modification
    time; a rerun opens none of those still unchanged, and a thumbnail truncated since (other
    size and time) is opened, found incomplete and redrawn."""
    from convlens.analysis import report as report_module
    from convlens.analysis import run as run_module
    from convlens.atomic import is_complete

    model = make_model(setup["dir"])
    run(model, setup)
    thumbs = sorted((setup["run"] / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 10
    opened: list[str] = []

    def counting_is_complete(path: str | Path) -> bool:
        if Path(path).parent.name == "thumbs":
            opened.append(Path(path).name)
        return is_complete(path)

    monkeypatch.setattr(run_module, "is_complete", counting_is_complete)
    monkeypatch.setattr(report_module, "is_complete", counting_is_complete)
    result = run(model, setup)
    assert opened == []  # every thumbnail recorded complete by the first run: none opened
    assert result.thumbnails == {p.id for p in result.predictions}
    cut = thumbs[3]
    cut.write_bytes(cut.read_bytes()[:60])  # truncated by another tool: other size and time
    run(model, setup)
    assert set(opened) == {cut.name}  # only that one checked (and again once redrawn)
    assert is_complete(cut)
    opened.clear()
    run(model, setup)
    assert opened == []  # the redrawn one was recorded too
    assert_report_links_complete(setup["run"])
