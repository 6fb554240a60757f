"""The Ray engine of ``analyze``: same answers as the local engine on a two-node local cluster,
corrupt images as failures, a driver interrupted mid-run and a worker killed mid-run.

The cluster (``ray.cluster_utils.Cluster``, two nodes of one CPU) is started once for the
module; the tests that need it skip without Ray Data (``pip install convlens[ray]``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from convlens.analysis import AnalysisResult, analyze
from convlens.analysis.run import select_examined
from convlens.errors import ConvlensError, InputError
from convlens.models import Preprocess, load_model
from convlens.models.base import ConvlensModel
from tests.helpers.cli import exit_code
from tests.helpers.models import tiny_net_source
from tests.helpers.runs import write_class_images

CLASSES = ("cat", "dog", "coffee mug")
BATCH = 4
SHARD = 4
# RISE and SmoothGrad are seeded: their maps must not depend on which worker draws them, nor
# on the other images of the chunk
METHODS = {
    "gradcam": {},
    "rise": {"masks": 24, "cells": 4, "batch_size": 12},
    "smoothgrad": {"samples": 3, "batch_size": 6},
}
COMPARE = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_engines.py"

# a model file whose forward kills its process once, in a batch (not while loading): when the
# marker file is there
CRASHING_NET = """
import os
from pathlib import Path

class CrashOnce(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # the first call is load_model's probe of the output size
        if self.calls > 1:
            try:
                Path(MARKER).unlink()
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return self.net(x)

def build_crashing():
    return CrashOnce(build())
"""


class Killed(BaseException):
    """The driver killed (not an ``Exception``: nothing on the way catches it)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two local Ray nodes of one CPU each, joined by this process."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        c.add_node(num_cpus=1)
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model file, class list and 13 images of three classes, one of them corrupt."""
    d = tmp_path_factory.mktemp("ray-data")
    (d / "net.py").write_text(tiny_net_source(seed=1))
    (d / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    images = write_class_images(d / "data", per_class=4)
    (images / "dog" / "broken.png").write_bytes(b"not really a png")
    return {"dir": d, "data": images}


def spec(d: Path, file: str = "net.py:build") -> functools.partial[ConvlensModel]:
    # 64 x 64 inputs: a decoded batch (4 x 3 x 64 x 64 float32, 192 KiB) is stored in the
    # object store of the node that decoded it, as a real batch is (Ray returns objects under
    # 100 KiB inline to the driver instead), so that Ray Data routes it to that node's actor
    return functools.partial(
        load_model,
        f"{d / file}",
        classes=d / "labels.txt",
        preprocess=Preprocess(resize=72, crop=64),
    )


def run(data: dict[str, Path], out: Path, engine: str = "ray", **kw: Any) -> AnalysisResult:
    kw = {
        "batch_size": BATCH,
        "top_errors": 3,
        "progress": False,
        "methods": METHODS,
        "engine": engine,
        **kw,
    }
    model_spec = kw.pop("model_spec", spec(data["dir"]))
    if engine == "ray":
        kw["model_spec"] = model_spec
    model = kw.pop("model", None) or model_spec()
    return analyze(model, data["data"], out, **kw)


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from convlens.analysis import engine_ray

    monkeypatch.setattr(engine_ray, "SHARD_SIZE", SHARD)


def close(a: Any, b: Any, path: str = "", rel: float = 1e-9) -> None:
    """``a == b``, floats to ``rel`` (NaN equal to NaN), recursively."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        same = math.isclose(a, b, rel_tol=rel, abs_tol=rel * 1e-3)
        assert (math.isnan(a) and math.isnan(b)) or same, (path, a, b)
    else:
        assert a == b, path


def same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal metrics: counts, accuracy, per-class tables, ECE, confusion, faithfulness to
    1e-9; the failure modes to float32 precision (the penultimate features are float32, and a
    batch's features may round differently in another process)."""
    close(*({k: v for k, v in m.items() if k != "failure_modes"} for m in (a, b)))
    close(a.get("failure_modes"), b.get("failure_modes"), "failure_modes", rel=1e-5)


def load_compare_engines() -> ModuleType:
    """``benchmarks/compare_engines.py`` (not a package: loaded from its path, its folder on
    ``sys.path`` for its ``_common``)."""
    import importlib.util

    sys.path.insert(0, str(COMPARE.parent))
    try:
        module_spec = importlib.util.spec_from_file_location("convlens_compare_engines", COMPARE)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # its dataclasses look their module up
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(COMPARE.parent))
    return module


def cluster_nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()


def same_predictions(ray_result: AnalysisResult, local: AnalysisResult) -> None:
    assert [p.path for p in ray_result.predictions] == [p.path for p in local.predictions]
    for p, q in zip(ray_result.predictions, local.predictions, strict=True):
        assert (p.id, p.label, p.top5, p.correct) == (q.id, q.label, q.top5, q.correct)
        close(list(p.probs5), list(q.probs5))
        close(p.loss, q.loss)
    assert ray_result.failures == local.failures


def test_same_answers_as_local_on_two_nodes(cluster, data, small_shards, tmp_path, caplog) -> None:
    local = run(data, tmp_path / "local", engine="local")
    with caplog.at_level(logging.INFO, logger="convlens.analysis.engine_ray"):
        result = run(data, tmp_path / "ray")
    same_predictions(result, local)
    # the corrupt image is a failure, with the local engine's reason; the batch survived
    assert [Path(p).name for p, _ in result.failures] == ["broken.png"]
    assert len(result.predictions) == 12
    # accuracy, per-class tables, ECE, confusion, faithfulness, failure modes: all of metrics
    same_metrics(result.metrics, local.metrics)
    same_metrics(
        json.loads((tmp_path / "ray" / "metrics.json").read_text()),
        json.loads((tmp_path / "local" / "metrics.json").read_text()),
    )
    assert set(result.explanations) == set(local.explanations) != set()
    close(result.faithfulness, local.faithfulness)
    # maps equal to an independent explain() of each image alone (seeded per image, so the
    # chunk an image was explained in does not matter)
    from convlens import explain
    from convlens.methods.options import build_methods

    model = spec(data["dir"])()
    examined = select_examined(local.predictions, local.metrics, 3)
    methods = list(build_methods(METHODS).values())
    for p in examined:  # each map equals the image explained alone (seeds are per image)
        x = model.load_images([p.path])
        expected = explain(model, x, methods, target=torch.tensor([[p.pred, p.label]]))
        got = np.load(tmp_path / "ray" / "explanations" / "maps" / f"{p.id}.npy")
        want = torch.cat([e.maps for e in expected.values()]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the whole report, figure for figure, as benchmarks/compare_engines.py compares it
    compare = load_compare_engines()
    checks = compare.compare(tmp_path / "local", tmp_path / "ray")
    assert [(c.what, c.mismatches) for c in checks if c.mismatches] == []
    assert all(c.count for c in checks if "failures" not in c.what)
    # every stage ran on both nodes, as nodes.json and the log say: the decoding tasks are
    # spread over the nodes (scheduling strategy SPREAD), a decoded batch goes to the actor
    # beside it (Ray Data's locality) or to the other one when that one is busy, and the
    # explanation chunks (more than one) are handed out one per free actor
    assert len(examined) > BATCH  # at least two chunks to explain
    alive = {n["NodeID"] for n in cluster_nodes() if n["Alive"]}
    assert len(alive) == 2
    nodes = json.loads((tmp_path / "ray" / "ray" / "nodes.json").read_text())
    assert {stage: set(ids) for stage, ids in nodes.items()} == {
        "decode": alive,
        "predict": alive,
        "explain": alive,
    }
    for stage in nodes:
        assert f"ray: {stage} ran on 2 node(s)" in caplog.text


def test_driver_killed_then_worker_killed_same_results(
    cluster, data, small_shards, tmp_path, monkeypatch
) -> None:
    """The driver dies after two shards (the second written but not in the store); the rerun
    skips the written shards, and one of its actors dies mid-batch (Ray restarts it and
    retries the batch): the results are those of the local engine."""
    from convlens.analysis import engine_ray

    marker = tmp_path / "crash-once"
    source = f"MARKER = {str(marker)!r}\n" + tiny_net_source(seed=1) + CRASHING_NET
    (tmp_path / "crashing.py").write_text(source)
    (tmp_path / "labels.txt").write_text((data["dir"] / "labels.txt").read_text())
    crashing = spec(tmp_path, "crashing.py:build_crashing")
    kw: dict[str, Any] = {"top_errors": 0, "faithfulness": False, "model_spec": crashing}
    finished: list[Path] = []
    original = engine_ray.RayEngine._finish_shard

    def interrupted(self, store, rows, file, thumbs, recorder):  # type: ignore[no-untyped-def]
        if len(finished) == 2:
            raise Killed  # the driver dies after two shards
        finished.append(file)
        return original(self, store, rows, file, thumbs, recorder)

    monkeypatch.setattr(engine_ray.RayEngine, "_finish_shard", interrupted)
    out = tmp_path / "ray"
    with pytest.raises(Killed):
        run(data, out, **kw)
    first = list(finished)
    assert len(first) == 2 and all(f.is_file() for f in first)
    # and the store lost the second shard (killed between its file and its transaction)
    import sqlite3

    import pyarrow.parquet as pq

    lost = [(os.fsdecode(p),) for p in pq.read_table(first[1]).column("path").to_pylist()]
    with sqlite3.connect(out / "predictions.sqlite") as conn:
        conn.executemany("DELETE FROM predictions WHERE path = ?", lost)
        conn.executemany("DELETE FROM failures WHERE path = ?", lost)

    done: list[Path] = []

    def counted(self, store, rows, file, thumbs, recorder):  # type: ignore[no-untyped-def]
        done.append(file)
        return original(self, store, rows, file, thumbs, recorder)

    monkeypatch.setattr(engine_ray.RayEngine, "_finish_shard", counted)
    driver = crashing()  # loaded before the marker: only an actor dies on it
    marker.touch()
    result = run(data, out, model=driver, **kw)
    assert not marker.exists()  # an actor died on it; Ray restarted it and retried its batch
    shards = sorted((out / "ray" / "predictions").glob("shard-*.parquet"))
    assert len(shards) == 4  # 13 images in shards of 4
    assert len(done) == 2 and not set(done) & set(first)  # finished shards not redone
    local = run(data, tmp_path / "local", engine="local", **kw)
    same_predictions(result, local)
    same_metrics(result.metrics, local.metrics)


def test_cli_passes_engine_and_model_spec(data, tmp_path, monkeypatch, capsys) -> None:
    """``--engine ray --address A`` reaches ``analyze`` with a picklable spec of the model
    options, which builds the model the CLI loaded."""
    import pickle

    import convlens.analysis

    seen: dict[str, Any] = {}

    def fake(model, data_dir, out, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw, model=model)
        raise InputError("stop here")

    monkeypatch.setattr(convlens.analysis, "analyze", fake)
    args = ["analyze", str(data["data"]), "--model", f"{data['dir'] / 'net.py'}:build"]
    args += ["--classes", str(data["dir"] / "labels.txt"), "--size", "32", "--out", "o"]
    ray_args = ["--engine", "ray", "--address", "auto", "--decode-cpus", "0.5"]
    assert exit_code([*args, *ray_args]) != 0
    assert "stop here" in capsys.readouterr().err
    assert (seen["engine"], seen["address"], seen["decode_cpus"]) == ("ray", "auto", 0.5)
    rebuilt = pickle.loads(pickle.dumps(seen["model_spec"]))()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.net(x), seen["model"].net(x))
    assert rebuilt.preprocess == seen["model"].preprocess


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"engine": "spark"}, "engine 'spark' is not one of: local, ray"),
        ({"address": "auto"}, "--address is for --engine ray"),
        ({"decode_cpus": 1.0}, "--decode-cpus is for --engine ray"),
    ],
)
def test_bad_engine_arguments(data, tmp_path, kw, text) -> None:
    with pytest.raises(InputError, match=text):
        run(data, tmp_path / "out", engine=kw.pop("engine", "local"), **kw)
    assert not (tmp_path / "out").exists()


def test_ray_missing_is_one_line(data, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConvlensError, match=r"pip install 'convlens\[ray\]'") as info:
        run(data, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_cli_bad_engine_is_one_line(data, tmp_path, capsys) -> None:
    base = ["analyze", str(data["data"]), "--out", str(tmp_path / "o")]
    assert exit_code([*base, "--engine", "spark"]) != 0
    assert exit_code([*base, "--address", "auto"]) != 0
    err = capsys.readouterr().err
    assert "engine 'spark' is not one of" in err and "--address is for --engine ray" in err


@pytest.mark.parametrize("cpus", [0, -1.0, math.inf, math.nan, True, "1"])
def test_bad_decode_cpus(data, cpus) -> None:
    pytest.importorskip("ray.data")
    from convlens.analysis.engine_ray import RayEngine

    with pytest.raises(InputError, match="decode_cpus must be a positive number"):
        RayEngine(spec(data["dir"]), {}, decode_cpus=cpus)


def test_decode_cpus_more_than_any_node_is_one_line(cluster, data) -> None:
    from convlens.analysis.engine_ray import RayEngine

    engine = RayEngine(spec(data["dir"]), {}, decode_cpus=3)
    with engine, pytest.raises(InputError, match=r"decode_cpus=3 is more than any node"):
        engine._resources()


def test_gpu_actors_get_a_batch_size_and_blocks_are_not_sliced(cluster, data) -> None:
    """Ray Data refuses GPU actors without a batch size: the stages of a GPU cluster are made
    (lazily: no GPU is needed to build them); the block-size limit is lifted for the run only."""
    import pyarrow as pa
    import ray

    from convlens.analysis.engine_ray import RayEngine

    context = ray.data.DataContext.get_current()
    before = context.target_max_block_size
    model = spec(data["dir"])()
    blocks = [pa.Table.from_pylist([{"shard": 0, "pos": 0, "path": b"x.png", "label": 0}])]
    gpu = {"compute": ray.data.ActorPoolStrategy(size=1), "num_gpus": 1, "num_cpus": 1}
    cpu = {"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": 0.5}
    with RayEngine(spec(data["dir"]), {}) as engine:
        assert context.target_max_block_size is None
        for actor in (gpu, cpu):
            ds = engine._prediction_stages(model, blocks, 4, actor, 0.5, None)
            assert isinstance(ds, ray.data.Dataset)
    assert context.target_max_block_size == before
