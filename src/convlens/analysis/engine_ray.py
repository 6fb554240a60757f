"""The Ray engine of :func:`~convlens.analysis.analyze` (``engine="ray"``): the prediction pass
and the explanations of the mistakes on a Ray cluster, with Ray Data.

What runs where:

- **Driver** (the process that calls ``analyze``): lists the data set (sorted), cuts it into
  shards of :data:`SHARD_SIZE` images (shard ``k``: images ``k * SHARD_SIZE`` up to the next),
  writes each finished shard as one Parquet file (atomically) and ingests it into the run's
  SQLite store, then computes the metrics, the failure modes and the report exactly as the
  local engine does (:mod:`convlens.analysis.run`).
- **CPU tasks** (``map_batches`` with a function): reading, decoding and preprocessing the
  images, and their thumbnails; an unreadable image becomes a row with its reason (a failure),
  never a failed batch.
- **Actor pool** (``map_batches`` with a class): the model, rebuilt in each actor from the
  picklable model spec (the network is never pickled), one GPU per actor when the cluster has
  GPUs, CPU actors otherwise: top-5 classes and probabilities, the label's loss, and the
  penultimate features for the failure modes.
- **Explainer actors**: the explanation panels and faithfulness scores of the examined images,
  chunk by chunk as the local engine cuts them, by the local engine's own code
  (:func:`~convlens.analysis.run._explain_chunk`); panels and maps (``.npy``) come back to
  the driver as bytes, so the workers need to read the data set but not the run folder.

Every shard file has the schema :func:`prediction_schema` (one row per image: a prediction, or
a failure with its reason); ``explanations/ray.parquet`` lists the explained images (panel and
map files, scores, the node that made them). ``ray/nodes.json`` and the log name the Ray nodes
that ran each stage.

Faults: Ray restarts a dead actor and retries its batch (``max_restarts``/``max_task_retries``,
Ray Data's defaults for actor pools), and retries failed tasks; a driver killed mid-run loses
only the shards in flight: a rerun skips the shards whose file is written (or whose images are
in the store).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.analysis.store import Prediction, PredictionStore, image_id
from convlens.atomic import atomic_write_bytes, atomic_write_text, is_complete
from convlens.console import printable
from convlens.errors import ConvlensError, InputError

if TYPE_CHECKING:
    from convlens.analysis.faithfulness import Scores
    from convlens.analysis.run import _FeatureRecorder
    from convlens.models.base import ConvlensModel
    from convlens.models.preprocess import Preprocess

__all__ = ["SHARD_SIZE", "RayEngine", "prediction_schema"]

log = logging.getLogger(__name__)

SHARD_SIZE = 256
"""Images per shard: the unit of the prediction pass that a rerun skips once written."""
RAY_DIR = "ray"
"""Folder of the Ray engine's files in the run folder."""
_K = 5
ACTOR_START_S = 600
"""Seconds an actor pool may take to start all its actors (then the run fails)."""


def _ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InputError(
            f"engine 'ray' needs Ray Data, which is not installed ({exc}); "
            "pip install 'convlens[ray]', or use --engine local"
        ) from None
    return ray


def prediction_schema() -> Any:
    """The Arrow schema of a prediction shard: one row per image.

    ``id`` (:func:`~convlens.analysis.store.image_id`), ``path`` (the file name's bytes, so
    that any name survives), ``label`` (null without one), ``top5`` / ``probs5`` (the most
    probable classes, most probable first, and their probabilities; empty for a failure),
    ``loss`` (cross-entropy of the label, or null), ``error`` (the reason an image failed, null
    for a prediction), ``features`` (the classifier's input, for the failure modes; null when
    not recorded), ``fc_name`` (the classifier those features feed), and the Ray node ids that
    decoded and predicted the image.
    """
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.binary()),
            ("label", pa.int64()),
            ("top5", pa.list_(pa.int64())),
            ("probs5", pa.list_(pa.float64())),
            ("loss", pa.float64()),
            ("error", pa.string()),
            ("features", pa.list_(pa.float32())),
            ("fc_name", pa.string()),
            ("decode_node", pa.string()),
            ("predict_node", pa.string()),
        ]
    )


def _node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _decode(batch: dict[str, np.ndarray], preprocess: Preprocess, side: int) -> dict[str, Any]:
    """CPU task: read and preprocess each image of ``batch``; an unreadable one gets zeros and
    its reason in ``error``. Thumbnails come back as JPEG bytes (the driver writes them)."""
    from convlens.analysis.run import THUMB_QUALITY, _thumbnail
    from convlens.images import load_image

    n = len(batch["path"])
    x = np.zeros((n, 3, side, side), np.float32)
    errors, thumbs = [], []
    for i, raw in enumerate(batch["path"]):
        try:
            image = load_image(os.fsdecode(bytes(raw)))
            x[i] = preprocess(image).numpy()
        except (ConvlensError, OSError) as exc:
            errors.append(str(exc) or type(exc).__name__)
            thumbs.append(b"")
            continue
        buf = io.BytesIO()
        _thumbnail(image).save(buf, format="JPEG", quality=THUMB_QUALITY)
        errors.append("")
        thumbs.append(buf.getvalue())
    return {
        **batch,
        "x": x,
        "error": np.array(errors, dtype=object),
        "thumb": np.array(thumbs, dtype=object),
        "decode_node": np.array([_node()] * n, dtype=object),
    }


def _use_assigned_cpus() -> int:
    """Give torch in this actor as many threads as the CPUs Ray assigned it (rounded up);
    the count set.

    Ray starts a worker with ``OMP_NUM_THREADS`` set to its whole CPUs, and to 1 for a
    fractional share (the 1.2 CPUs of an actor on a 2-CPU node), so torch would run one
    thread where the local engine runs one per core: measured, that alone made the Ray
    engine's prediction pass twice as slow on 2 cores. The actor's process is the stage's
    own, so nothing is restored; the driver is not touched. Within this limit each batch's
    threads then follow the load as the local engine's do
    (:meth:`~convlens.accel.Acceleration.threads_for_call`)."""
    import ray
    import torch

    cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    threads = max(1, math.ceil(cpus - 1e-6))
    torch.set_num_threads(threads)
    return threads


def _load(spec: Callable[[], ConvlensModel]) -> ConvlensModel:
    """The model built by ``spec`` in this worker, on its GPU when Ray gave it one, with
    torch threads for the CPUs Ray gave it (:func:`_use_assigned_cpus`)."""
    import ray

    _use_assigned_cpus()
    model = spec()
    if ray.get_gpu_ids():
        model.to("cuda")
    return model


class _Predictor:
    """Actor: the model rebuilt from its spec; top-5, probabilities, loss and features of each
    decoded image, by the local engine's :func:`~convlens.analysis.run._launch_batch`."""

    def __init__(self, spec: Callable[[], ConvlensModel], features: bool) -> None:
        self.model = _load(spec)
        self.features = features
        self.fc_name: str | None = None
        self.searched = False
        self.node = _node()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from convlens.analysis.failure_modes import FeatureCapture
        from convlens.analysis.run import NOT_FINITE, _finish_batch, _launch_batch, _Launched
        from convlens.hooks.state import model_state

        n = len(batch["path"])
        k = min(_K, len(self.model.classes))
        top5 = np.full((n, k), -1, np.int64)
        probs5 = np.zeros((n, k), np.float64)
        loss = np.full(n, math.nan)
        errors = np.array(batch["error"], dtype=object)
        feats: np.ndarray | None = None
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            paths = [os.fsdecode(bytes(batch["path"][i])) for i in ok]
            labels = [None if batch["label"][i] < 0 else int(batch["label"][i]) for i in ok]
            x = torch.from_numpy(np.ascontiguousarray(batch["x"][ok])).to(self.model.device)
            capture = None
            if self.features and (self.fc_name is not None or not self.searched):
                capture = FeatureCapture(self.fc_name)
            with (
                model_state(self.model.net, eval_mode=True, grads=False),
                torch.no_grad(),
                self.model.accel.threads_for_call(self.model.device),
                capture.once(self.model.net) if capture is not None else contextlib.nullcontext(),
            ):
                launched = _Launched(list(range(len(ok))), [])
                (
                    launched.top_probs,
                    launched.top_classes,
                    launched.label_log_probs,
                    launched.finite,
                    launched.ready,
                ) = _launch_batch(self.model, x, labels)
            if capture is not None:
                self.searched = True
                self.fc_name = capture.fc_name
                if capture.value is not None:
                    value = capture.value.cpu().numpy().astype(np.float32)
                    feats = np.zeros((n, value.shape[1]), np.float32)
                    feats[ok] = value
            preds, bad = _finish_batch(launched, list(zip(paths, labels, strict=True)))
            by_path = {p.path: p for p in preds}
            for j, i in enumerate(ok):
                p = by_path.get(paths[j])
                if p is None:
                    errors[i] = NOT_FINITE
                    continue
                top5[i, : len(p.top5)] = p.top5
                probs5[i, : len(p.probs5)] = p.probs5
                loss[i] = math.nan if p.loss is None else p.loss
            assert len(bad) + len(preds) == len(ok)
        out = {
            "shard": batch["shard"],
            "pos": batch["pos"],
            "path": batch["path"],
            "label": batch["label"],
            "thumb": batch["thumb"],
            "decode_node": batch["decode_node"],
            "error": errors,
            "top5": top5,
            "probs5": probs5,
            "loss": loss,
            "fc_name": np.array([self.fc_name or ""] * n, dtype=object),
            "predict_node": np.array([self.node] * n, dtype=object),
        }
        if feats is not None:
            out["features"] = feats
        return out


class _Explainer:
    """Actor: explains and scores whole chunks of examined images with the local engine's
    :func:`~convlens.analysis.run._explain_chunk`, into a scratch folder; the files come back
    as bytes."""

    def __init__(
        self, spec: Callable[[], ConvlensModel], specs: Mapping[str, Mapping[str, Any]]
    ) -> None:
        from convlens.methods.options import build_methods

        self.model = _load(spec)
        self.methods = build_methods({k: dict(v) for k, v in specs.items()})
        self.node = _node()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from convlens.analysis.run import _explain_chunk

        results = []
        for payload in batch["payload"]:
            part, need_panel, need_score, batch_size = pickle.loads(payload)
            with tempfile.TemporaryDirectory(prefix="convlens-explain-") as tmp:
                scratch = Path(tmp)
                files = {p.id: scratch / f"{p.id}.png" for p in part}
                failed, scores = _explain_chunk(
                    self.model,
                    part,
                    self.methods,
                    files,
                    need_panel,
                    need_score,
                    batch_size=batch_size,
                    maps=scratch,
                )
                panels = {i: f.read_bytes() for i, f in files.items() if is_complete(f)}
                maps = {
                    p.id: (scratch / f"{p.id}.npy").read_bytes()
                    for p in part
                    if (scratch / f"{p.id}.npy").is_file()
                }
            results.append(pickle.dumps((failed, scores, panels, maps)))
        return {
            "chunk": batch["chunk"],
            "result": np.array(results, dtype=object),
            "node": np.array([self.node] * len(results), dtype=object),
        }


def _blocks(rows: Sequence[dict[str, Any]], batch_size: int) -> list[Any]:
    """``rows`` as Arrow tables of ``batch_size`` rows (the last one shorter), in order: one
    Ray Data block per batch.

    Each block is then one decoding task, one decoded batch and one actor batch, the batches
    of the local engine: the pipeline streams batch by batch (the first batch is predicted
    while the next ones are decoded), the decoding fans out over as many tasks as there are
    batches, and an actor pool of one actor per block receives a block per actor. Blocks of
    a whole shard would be decoded in one task each, and Ray Data buffers a task's output
    into blocks of up to 128 MiB: on 200 images nothing was predicted before all were
    decoded."""
    import pyarrow as pa

    return [
        pa.Table.from_pylist(list(rows[i : i + batch_size]))
        for i in range(0, len(rows), batch_size)
    ]


def _shard_name(k: int, shard: Sequence[tuple[str, int | None]]) -> str:
    """The file name of shard ``k``: its number and a hash of its images and labels (a shard
    of another listing is not taken for it)."""
    h = hashlib.sha256()
    for path, label in shard:
        h.update(os.fsencode(path) + b"\0" + str(label).encode() + b"\n")
    return f"shard-{k:06d}-{h.hexdigest()[:12]}.parquet"


def _read_shard(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a shard file, or ``None`` when it cannot be read (it is then redone)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, schema=prediction_schema()).to_pylist()
    except (OSError, ValueError) as exc:
        log.warning("redoing shard %s: unreadable (%s)", path.name, exc)
        return None


class RayEngine:
    """The Ray engine of :func:`~convlens.analysis.analyze` (see the module's docstring).

    Used as a context manager around the run: it joins the cluster (``address``; without it,
    the cluster this process is connected to, else a new local one) and leaves it after.

    Args:
        model_spec: picklable callable without arguments that builds the model in a worker.
        specs: the explanation methods and their options (rebuilt in each explainer actor).
        address: the cluster's address for ``ray.init``.
        actors: actors per pool (default: one per GPU, or one per node without GPUs).
        decode_cpus: CPUs of each decoding task (default: 1 with GPUs; without, 40% of the
            smallest node's CPUs, at most 1); less runs more decoding tasks at once per
            node (the decode fan-out: a node's CPUs left beside its actor, divided by this).

    Raises:
        InputError: Ray Data is not installed, ``model_spec`` is missing or not callable, or
            ``decode_cpus`` is not a positive number.
    """

    def __init__(
        self,
        model_spec: Callable[[], ConvlensModel] | None,
        specs: Mapping[str, Mapping[str, Any]],
        *,
        address: str | None = None,
        actors: int | None = None,
        decode_cpus: float | None = None,
    ) -> None:
        _ray()
        if decode_cpus is not None and (
            isinstance(decode_cpus, bool)
            or not isinstance(decode_cpus, (int, float))
            or not 0 < decode_cpus < math.inf
        ):
            raise InputError(f"decode_cpus must be a positive number, not {decode_cpus!r}")
        if model_spec is None or not callable(model_spec):
            raise InputError(
                "engine='ray' needs model_spec=, a picklable callable that builds the model in "
                "each worker, e.g. functools.partial(load_model, 'net.py:build', weights='w.pt')"
            )
        self.spec = model_spec
        self.specs = {k: dict(v) for k, v in specs.items()}
        self.address = address
        self.actors = actors
        self.decode_cpus = None if decode_cpus is None else float(decode_cpus)
        self.nodes: dict[str, set[str]] = {"decode": set(), "predict": set(), "explain": set()}
        self._own = False
        self._folder: Path | None = None
        self._context: tuple[Any, bool, int, int | None] | None = None

    def __enter__(self) -> RayEngine:
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a new local cluster"
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InputError(f"cannot start Ray on {where}: {text}") from None
            self._own = True
        with warnings.catch_warnings():
            # Ray Data 2.60 warns that use_push_based_shuffle is deprecated whenever it makes
            # its context, even when nobody sets it
            warnings.simplefilter("ignore", DeprecationWarning)
            context = ray.data.DataContext.get_current()
        self._context = (
            context,
            context.enable_progress_bars,
            context.wait_for_min_actors_s,
            context.target_max_block_size,
        )
        context.enable_progress_bars = False
        # a decoded batch stays one block: Ray Data would slice a block over 1.5 x its target
        # size (128 MiB: about 330 images of 224 x 224), and the model would see sub-batches
        context.target_max_block_size = None
        # the pools start whole before the first batch: every node gets its actor, rather
        # than the first actor up taking every batch of a small run
        context.wait_for_min_actors_s = ACTOR_START_S
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._context is not None:
            context, bars, wait, block = self._context
            context.enable_progress_bars, context.wait_for_min_actors_s = bars, wait
            context.target_max_block_size = block
            self._context = None
        if self._own:
            _ray().shutdown()
            self._own = False
        return False

    def _resources(self, most: int | None = None) -> tuple[dict[str, Any], float]:
        """Resources of an actor pool, and the CPUs of a decoding task.

        With GPUs: one actor per GPU (one CPU each), decoding tasks of one CPU. Without:
        one actor per node, on 60% of the smallest node's CPUs (more than half, so that no
        node gets two), and decoding tasks on the rest (at most one CPU each), so that the
        decoding always finds a CPU beside the actors."""
        ray = _ray()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        alive = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]

        def pool(size: int) -> Any:
            size = max(1, min(size, most or size))  # no more actors than inputs
            # one batch in flight per actor: a batch goes to the next free actor, not to the
            # one beside the node that decoded it (Ray Data prefers those)
            return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)

        most_cpus = max((float(n["Resources"]["CPU"]) for n in alive), default=1.0)
        if self.decode_cpus is not None and self.decode_cpus > most_cpus:
            raise InputError(
                f"decode_cpus={self.decode_cpus:g} is more than any node has "
                f"({most_cpus:g} CPUs): no decoding task could ever start"
            )
        if gpus:
            actor = {"compute": pool(self.actors or gpus), "num_gpus": 1, "num_cpus": 1}
            return actor, self.decode_cpus or 1.0
        cpus = min((float(n["Resources"]["CPU"]) for n in alive), default=1.0)
        actor = {"compute": pool(self.actors or max(1, len(alive))), "num_cpus": 0.6 * cpus}
        return actor, self.decode_cpus or min(1.0, 0.4 * cpus)

    @contextlib.contextmanager
    def _pool_start(self, size: int) -> Iterator[None]:
        """Ray Data's wait for an actor pool's actors, for the stage made and run in the block.

        A pool of several actors starts whole before its first batch: every node gets its
        actor, rather than the first one up taking every batch of a small run. A pool of one
        actor is not waited for: the decoding tasks start beside the actor's start rather
        than after it (their worker's start and imports took 10-15 s of a 60 s run of 200
        images on 2 busy cores)."""
        if self._context is None:
            yield
            return
        context = self._context[0]
        before = context.wait_for_min_actors_s
        context.wait_for_min_actors_s = ACTOR_START_S if size > 1 else -1
        try:
            yield
        finally:
            context.wait_for_min_actors_s = before

    def _record_nodes(self) -> None:
        if self._folder is None:
            return
        nodes = {stage: sorted(ids) for stage, ids in self.nodes.items()}
        for stage, ids in nodes.items():
            if ids:
                log.info("ray: %s ran on %d node(s): %s", stage, len(ids), ", ".join(ids))
        atomic_write_text(self._folder / "nodes.json", json.dumps(nodes, indent=2))

    def infer(
        self,
        model: ConvlensModel,
        store: PredictionStore,
        items: Sequence[tuple[str, int | None]],
        *,
        thumbs: Path,
        batch_size: int,
        workers: int,
        progress: bool,
        recorder: _FeatureRecorder | None = None,
    ) -> None:
        """The prediction pass of the images not yet in the store, shard by shard, into the
        store (same arguments as the local engine's ``_infer``; ``workers`` is not used: Ray
        schedules the decoding tasks)."""
        from convlens.analysis.run import NOT_FINITE

        self._folder = thumbs.parent / RAY_DIR
        folder = self._folder / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        done = store.finished_paths(retry=[NOT_FINITE])
        todo: dict[int, tuple[list[tuple[str, int | None]], Path]] = {}
        reused = 0
        for k in range(0, math.ceil(len(items) / SHARD_SIZE)):
            shard = list(items[k * SHARD_SIZE : (k + 1) * SHARD_SIZE])
            if all(p in done for p, _ in shard):
                continue
            file = folder / _shard_name(k, shard)
            rows = _read_shard(file) if file.is_file() else None
            if rows is not None and not any(r["error"] == NOT_FINITE for r in rows):
                self._ingest(store, rows, thumbs, recorder)  # written, not ingested: killed
                reused += 1
                continue
            todo[k] = (shard, file)
        if reused:
            log.info("resuming: %d shard(s) read from their files", reused)
        if not todo:
            return
        log.info(
            "ray: predicting %d shard(s) of up to %d images (%d left of %d)",
            len(todo),
            SHARD_SIZE,
            sum(len(s) for s, _ in todo.values()),
            len(items),
        )
        rows = [
            {"shard": k, "pos": i, "path": os.fsencode(p), "label": -1 if lbl is None else lbl}
            for k, (shard, _) in todo.items()
            for i, (p, lbl) in enumerate(shard)
        ]
        blocks = _blocks(rows, batch_size)
        actor, decode_cpus = self._resources(most=len(blocks))
        with self._pool_start(actor["compute"].min_size):
            ds = self._prediction_stages(model, blocks, batch_size, actor, decode_cpus, recorder)
            self._collect(ds, store, todo, len(rows), thumbs, progress, recorder)
        self._record_nodes()

    def _prediction_stages(
        self,
        model: ConvlensModel,
        blocks: list[Any],
        batch_size: int,
        actor: dict[str, Any],
        decode_cpus: float,
        recorder: _FeatureRecorder | None,
    ) -> Any:
        """The dataset of the prediction pass: the decoding tasks, then the actor pool."""
        ray = _ray()
        ds = ray.data.from_arrow(blocks)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates free remote arguments (removal announced for 2.64) and has
            # no named parameter for a scheduling strategy yet
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(
                _decode,
                fn_kwargs={"preprocess": model.preprocess, "side": model.preprocess.crop},
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=decode_cpus,
                # spread over the nodes rather than packed beside the data (Ray's default)
                scheduling_strategy="SPREAD",
            )
        ds = ds.map_batches(
            _Predictor,
            fn_constructor_kwargs={"spec": self.spec, "features": recorder is not None},
            # each decoded batch whole: the model sees the local engine's batches (float32
            # results depend on the batch), never rows of two blocks regrouped by Ray Data.
            # Ray Data refuses GPU actors without a batch size: there the batches are cut
            # anew at batch_size (only the last, shorter block can be regrouped)
            batch_size=batch_size if actor.get("num_gpus") else None,
            batch_format="numpy",
            **actor,
        )
        return ds

    def _collect(
        self,
        ds: Any,
        store: PredictionStore,
        todo: Mapping[int, tuple[list[tuple[str, int | None]], Path]],
        total: int,
        thumbs: Path,
        progress: bool,
        recorder: _FeatureRecorder | None,
    ) -> None:
        """Run ``ds`` and write and ingest each shard as soon as its images are all back."""
        pending: dict[int, list[dict[str, Any]]] = {}
        columns = ("shard", "pos", "path", "label", "error", "top5", "probs5", "loss")
        with _bar(progress, "predicting (ray)", total) as advance:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch["shard"])
                for i in range(n):
                    row = {c: batch[c][i] for c in columns}
                    row["thumb"] = batch["thumb"][i]
                    row["features"] = batch["features"][i] if "features" in batch else None
                    row["fc_name"] = batch["fc_name"][i]
                    row["decode_node"] = batch["decode_node"][i]
                    row["predict_node"] = batch["predict_node"][i]
                    k = int(row["shard"])
                    pending.setdefault(k, []).append(row)
                    if len(pending[k]) == len(todo[k][0]):
                        self._finish_shard(store, pending.pop(k), todo[k][1], thumbs, recorder)
                advance(n)

    def _finish_shard(
        self,
        store: PredictionStore,
        rows: list[dict[str, Any]],
        file: Path,
        thumbs: Path,
        recorder: _FeatureRecorder | None,
    ) -> None:
        """Write a finished shard's thumbnails and Parquet file, then ingest it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows.sort(key=lambda r: int(r["pos"]))
        table = []
        for r in rows:
            path = os.fsdecode(bytes(r["path"]))
            label = int(r["label"])
            failed = bool(r["error"])
            if r["thumb"]:
                thumb = thumbs / f"{image_id(path)}.jpg"
                if not is_complete(thumb):
                    try:
                        atomic_write_bytes(thumb, bytes(r["thumb"]))
                    except OSError as exc:
                        log.warning("no thumbnail for the report: %s", exc)
            table.append(
                {
                    "id": image_id(path),
                    "path": bytes(r["path"]),
                    "label": None if label < 0 else label,
                    "top5": [] if failed else [int(c) for c in r["top5"]],
                    "probs5": [] if failed else [float(v) for v in r["probs5"]],
                    "loss": None if failed or label < 0 else float(r["loss"]),
                    "error": str(r["error"]) if failed else None,
                    "features": None
                    if failed or r["features"] is None
                    else [float(v) for v in r["features"]],
                    "fc_name": str(r["fc_name"]) or None,
                    "decode_node": str(r["decode_node"]),
                    "predict_node": str(r["predict_node"]),
                }
            )
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(table, schema=prediction_schema()), buf)
        atomic_write_bytes(file, buf.getvalue())
        self._ingest(store, table, thumbs, recorder)

    def _ingest(
        self,
        store: PredictionStore,
        rows: list[dict[str, Any]],
        thumbs: Path,
        recorder: _FeatureRecorder | None,
    ) -> None:
        """Store the rows of one shard (one transaction) and their features."""
        preds, failures, ids, feats = [], [], [], []
        fc_name = None
        for r in rows:
            path = os.fsdecode(r["path"])
            self.nodes["decode"].add(r["decode_node"])
            if r["error"]:
                failures.append((path, r["error"]))
                log.warning("skipped %s: %s", printable(path), printable(str(r["error"])))
                continue
            self.nodes["predict"].add(r["predict_node"])
            label = r["label"]
            top5 = tuple(r["top5"])
            preds.append(
                Prediction(
                    id=r["id"],
                    path=path,
                    label=label,
                    top5=top5,
                    probs5=tuple(r["probs5"]),
                    loss=r["loss"],
                    correct=None if label is None else top5[0] == label,
                )
            )
            if r["features"] is not None and r["fc_name"]:
                fc_name = r["fc_name"]
                ids.append(r["id"])
                feats.append(np.asarray(r["features"], np.float32))
        store.add_batch(preds, failures)
        if recorder is not None and fc_name is not None:
            recorder.adopt(fc_name)
            if recorder.cache is not None and ids:
                recorder.cache.add(ids, np.stack(feats))

    def explain_chunks(
        self,
        parts: Sequence[Sequence[Prediction]],
        files: Mapping[str, Path],
        need_panel: set[str],
        need_score: set[str],
        *,
        batch_size: int,
    ) -> Iterator[tuple[Sequence[Prediction], list[tuple[str, str]], Scores]]:
        """Explain the chunks ``parts`` in the explainer actors (as the local engine would,
        one :func:`~convlens.analysis.run._explain_chunk` each); write the panels to ``files``
        and the maps beside them (``maps/ID.npy``); yield ``(chunk, unreadable, scores)`` as
        the chunks finish. ``explanations/ray.parquet`` then lists the explained images."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not parts:
            return
        ray = _ray()
        rows = [
            {
                "chunk": c,
                "payload": pickle.dumps(
                    (
                        list(part),
                        {p.id for p in part if p.id in need_panel},
                        {p.id for p in part if p.id in need_score},
                        batch_size,
                    )
                ),
            }
            for c, part in enumerate(parts)
        ]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _Explainer,
            fn_constructor_kwargs={"spec": self.spec, "specs": self.specs},
            batch_size=1,
            batch_format="numpy",
            **self._resources(most=len(rows))[0],
        )
        folder = next(iter(files.values())).parent
        maps_dir = folder / "maps"
        listed: list[dict[str, Any]] = []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for c, result, node in zip(batch["chunk"], batch["result"], batch["node"], strict=True):
                part = parts[int(c)]
                failed, scores, panels, maps = pickle.loads(bytes(result))
                self.nodes["explain"].add(str(node))
                for i, data in panels.items():
                    atomic_write_bytes(files[i], data)
                for i, data in maps.items():
                    atomic_write_bytes(maps_dir / f"{i}.npy", data)
                bad = {path for path, _ in failed}
                for p in part:
                    listed.append(
                        {
                            "id": p.id,
                            "path": os.fsencode(p.path),
                            "panel": str(files[p.id]) if p.id in panels else None,
                            "maps": str(maps_dir / f"{p.id}.npy") if p.id in maps else None,
                            "scores": json.dumps(scores[p.id]) if p.id in scores else None,
                            "error": next((r for q, r in failed if q == p.path), None)
                            if p.path in bad
                            else None,
                            "node": str(node),
                        }
                    )
                yield part, list(failed), scores
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(listed, schema=explanation_schema()), buf)
        atomic_write_bytes(folder / "ray.parquet", buf.getvalue())
        self._record_nodes()


def explanation_schema() -> Any:
    """The Arrow schema of ``explanations/ray.parquet``: one row per image explained in the
    run: ``id``, ``path`` (bytes), the ``panel`` PNG and ``maps`` ``.npy`` files (null when
    none was made), the faithfulness ``scores`` as JSON (null when none), ``error`` (why the
    image could not be explained) and the Ray ``node`` that explained it."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.binary()),
            ("panel", pa.string()),
            ("maps", pa.string()),
            ("scores", pa.string()),
            ("error", pa.string()),
            ("node", pa.string()),
        ]
    )


@contextlib.contextmanager
def _bar(progress: bool, title: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar's ``advance`` (a no-op without ``progress``)."""
    from convlens.analysis.run import _progress

    with _progress(progress) as bar:
        if bar is None:
            yield lambda n: None
            return
        task = bar.add_task(title, total=total)
        yield lambda n: bar.advance(task, n)
