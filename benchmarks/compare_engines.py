"""The same report from both engines, figure for figure: ``analyze`` with ``engine="local"``
and with ``engine="ray"`` on the same data, every result compared.

Both engines run the full analysis (predictions, metrics, the explanations of the most
confident mistakes with Grad-CAM and a seeded method, SmoothGrad by default, their
faithfulness scores, the failure modes and the report) into two run folders, then the script
compares:

- ``metrics.json``: every number (counts, accuracy, top-5, per-class tables, ECE and its bins,
  confused pairs, faithfulness summary, failure-mode clusters and their channels), integers
  and strings exactly, floats to :data:`REL`;
- the predictions in ``predictions.sqlite``: paths, labels, top-5 classes exactly,
  probabilities and losses to :data:`REL`; the failures and their reasons exactly;
- the examined images: the explanation panels and the map files made;
- each map ``explanations/maps/ID.npy``: shape exactly, values to :data:`MAP_TOL` of the
  map's largest magnitude;
- the faithfulness scores of each image and method (``faithfulness.json``) to :data:`AUC_TOL`;
- the report's HTML pages: the text with every number taken out exactly, the numbers to
  :data:`REL` (as printed);
- the run folders' files: the same names (but for the Ray engine's own ``ray/`` files), and
  every image (plots, panels, failure-mode pages, thumbnails) decoded, pixel for pixel to
  :data:`PIXEL_TOL` levels;

prints a table (what was compared, how many, the largest difference, the tolerance) and exits
with 1 on any mismatch. The Ray engine runs on a new local Ray instance (``--cpus`` CPUs), the
model rebuilt in each actor from ``functools.partial(load_model, MODEL)``.

    python benchmarks/compare_engines.py                          # the 200 dev photos
    python benchmarks/compare_engines.py --augmented 1000         # 1000 augmented images
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import html
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.analysis import analyze
from convlens.analysis.store import PredictionStore
from convlens.models import load_model

from _common import command_line, default_data, git_commit, load_average, machine_line

log = logging.getLogger("compare_engines")

REL = 1e-5
"""Relative tolerance of a float (probabilities, losses, metrics): float32 arithmetic in
another process, with other thread counts, rounds differently."""
MAP_TOL = 1e-4
"""Tolerance of a map value, as a fraction of the map's largest magnitude."""
AUC_TOL = 1e-4
"""Absolute tolerance of a deletion or insertion area (in [0, 1])."""
PIXEL_TOL = 0
"""Largest difference of a pixel's channel value (0-255) in an image file."""
ENGINE_ONLY = ("ray/", "explanations/ray.parquet")
"""Files of one engine only (the Ray engine's shards, node list and list of explanations)."""
SKIPPED = (".lock", "predictions.sqlite", "-wal", "-shm", "config.json")
"""Files compared otherwise (the store by its rows) or not results (the folder lock)."""


@dataclass
class Check:
    """One row of the table: what was compared, how many, the largest difference."""

    what: str
    tolerance: str
    count: int = 0
    largest: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    def number(self, a: float, b: float, where: str, rel: float = REL) -> None:
        """Compare two floats (NaN equals NaN) to ``rel``."""
        self.count += 1
        if math.isnan(a) or math.isnan(b):
            if not (math.isnan(a) and math.isnan(b)):
                self.mismatches.append(f"{where}: {a} != {b}")
            return
        diff = abs(a - b) / max(abs(a), abs(b), 1e-12) if a != b else 0.0
        self.largest = max(self.largest, diff)
        if diff > rel:
            self.mismatches.append(f"{where}: {a!r} != {b!r}")

    def same(self, a: Any, b: Any, where: str) -> None:
        """Compare two values exactly."""
        self.count += 1
        if a != b:
            self.mismatches.append(f"{where}: {a!r} != {b!r}")


def compare_values(check: Check, a: Any, b: Any, where: str = "") -> None:
    """Compare two JSON values: structure, integers, booleans and strings exactly, floats to
    :data:`REL`."""
    if isinstance(a, dict) and isinstance(b, dict):
        check.same(sorted(a), sorted(b), f"{where} keys")
        for k in a.keys() & b.keys():
            compare_values(check, a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        check.same(len(a), len(b), f"{where} length")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            compare_values(check, x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            check.number(float(a), float(b), where)
        else:
            check.same(a, b, where)
    else:
        check.same(a, b, where)


def metrics_checks(a: Path, b: Path) -> list[Check]:
    """One check per part of ``metrics.json``."""
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    ece = [k for k in ma if "calib" in k or "ece" in k.lower()]
    groups = {
        "accuracy, counts": [k for k in ma if not isinstance(ma[k], (dict, list)) and k not in ece],
        "per-class tables": ["per_class"],
        "ECE and its bins": ece,
        "confused pairs, confusion": [k for k in ma if "confus" in k],
        "failure modes": ["failure_modes"],
        "faithfulness summary": ["faithfulness"],
    }
    taken = {k for keys in groups.values() for k in keys}
    groups["everything else"] = [k for k in ma if k not in taken]
    checks = []
    for name, keys in groups.items():
        check = Check(f"metrics.json: {name} ({', '.join(keys) or 'none'})", f"floats {REL:g} rel")
        for k in keys:
            compare_values(check, ma.get(k), mb.get(k), k)
        checks.append(check)
    extra = Check("metrics.json: same keys", "exact")
    extra.same(sorted(ma), sorted(mb), "keys")
    return [*checks, extra]


def prediction_checks(a: Path, b: Path) -> list[Check]:
    """Top-5 classes, probabilities, losses and failures from the two stores."""
    with (
        PredictionStore(a / "predictions.sqlite") as sa,
        PredictionStore(b / "predictions.sqlite") as sb,
    ):
        pa, pb = sa.predictions(), sb.predictions()
        fa, fb = sa.failures(), sb.failures()
    top = Check("predictions: path, label, top-5 classes, correct", "exact")
    probs = Check("predictions: top-5 probabilities, loss", f"{REL:g} rel")
    top.same(len(pa), len(pb), "number of predictions")
    qb = {q.path: q for q in pb}
    for p in pa:
        q = qb.get(p.path)
        if q is None:
            top.mismatches.append(f"{p.path}: not predicted by ray")
            continue
        top.same((p.id, p.label, p.top5, p.correct), (q.id, q.label, q.top5, q.correct), p.path)
        if len(p.probs5) != len(q.probs5):
            probs.mismatches.append(f"{p.path}: {len(p.probs5)} != {len(q.probs5)} probabilities")
        for k, (x, y) in enumerate(zip(p.probs5, q.probs5, strict=False)):
            probs.number(x, y, f"{p.path} probs5[{k}]")
        probs.number(
            math.nan if p.loss is None else p.loss, math.nan if q.loss is None else q.loss, p.path
        )
    top.count = len(pa)  # images, not comparisons
    failures = Check("failures and their reasons", "exact")
    failures.same(sorted(fa), sorted(fb), "failures")
    failures.count = len(fa)
    return [top, probs, failures]


def stems(folder: Path, pattern: str) -> set[str]:
    return {f.stem for f in folder.glob(pattern)}


def explanation_checks(a: Path, b: Path) -> list[Check]:
    """The examined images, their maps and their faithfulness scores."""
    ea, eb = a / "explanations", b / "explanations"
    examined = Check("examined images (panels, map files)", "exact")
    panels = stems(ea, "*.png")
    examined.same(panels, stems(eb, "*.png"), "explanation panels")
    examined.same(stems(ea / "maps", "*.npy"), stems(eb / "maps", "*.npy"), "map files")
    examined.same(panels, stems(ea / "maps", "*.npy"), "a map file for each panel (local)")
    examined.count = len(panels)
    maps = Check("maps (methods x predicted/true class x H x W)", f"{MAP_TOL:g} of max |map|")
    for pid in sorted(stems(ea / "maps", "*.npy") & stems(eb / "maps", "*.npy")):
        x = np.load(ea / "maps" / f"{pid}.npy")
        y = np.load(eb / "maps" / f"{pid}.npy")
        if x.shape != y.shape:
            maps.mismatches.append(f"{pid}: shape {x.shape} != {y.shape}")
            continue
        for m in range(x.shape[0]):
            for t in range(x.shape[1]):
                maps.count += 1
                scale = max(float(np.abs(x[m, t]).max()), float(np.abs(y[m, t]).max()), 1e-30)
                diff = float(np.abs(x[m, t].astype(np.float64) - y[m, t]).max()) / scale
                maps.largest = max(maps.largest, diff)
                if diff > MAP_TOL:
                    maps.mismatches.append(f"{pid} method {m} target {t}: {diff:.2e} of max")
    scores = Check("faithfulness: deletion/insertion AUC per image and method", f"{AUC_TOL:g} abs")
    fa = json.loads((ea / "faithfulness.json").read_text())
    fb = json.loads((eb / "faithfulness.json").read_text())
    sa, sb = fa["images"], fb["images"]
    scores.same(sorted(sa), sorted(sb), "scored images")
    for pid in sa.keys() & sb.keys():
        scores.same(sorted(sa[pid]), sorted(sb[pid]), f"{pid} methods")
        for method in sa[pid].keys() & sb[pid].keys():
            for k in sa[pid][method].keys() | sb[pid][method].keys():
                x, y = sa[pid][method].get(k), sb[pid][method].get(k)
                scores.count += 1
                if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                    if x != y:
                        scores.mismatches.append(f"{pid} {method} {k}: {x!r} != {y!r}")
                    continue
                scores.largest = max(scores.largest, abs(x - y))
                if abs(x - y) > AUC_TOL:
                    scores.mismatches.append(f"{pid} {method} {k}: {x} != {y}")
    return [examined, maps, scores]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def html_text(path: Path) -> str:
    """A page's text and attributes, unescaped."""
    return html.unescape(path.read_text(encoding="utf-8"))


def html_checks(a: Path, b: Path) -> list[Check]:
    """Every report page: its text without numbers exactly, its numbers to :data:`REL`."""
    pages = Check("report HTML: pages, text without the numbers", "exact")
    numbers = Check("report HTML: every number printed", f"{REL:g} rel")
    ra, rb = a / "report", b / "report"
    names_a = sorted(p.relative_to(ra).as_posix() for p in ra.rglob("*.html"))
    names_b = sorted(p.relative_to(rb).as_posix() for p in rb.rglob("*.html"))
    pages.same(names_a, names_b, "report pages")
    for name in sorted(set(names_a) & set(names_b)):
        ta, tb = html_text(ra / name), html_text(rb / name)
        pages.same(_NUMBER.sub("#", ta) == _NUMBER.sub("#", tb), True, f"{name} text")
        na, nb = _NUMBER.findall(ta), _NUMBER.findall(tb)
        if len(na) != len(nb):
            pages.mismatches.append(f"{name}: {len(na)} numbers != {len(nb)}")
            continue
        for k, (x, y) in enumerate(zip(na, nb, strict=True)):
            if x != y:
                numbers.number(float(x), float(y), f"{name} number {k} ({x} vs {y})")
            else:
                numbers.count += 1
    return [pages, numbers]


def files(folder: Path) -> set[str]:
    out = set()
    for f in folder.rglob("*"):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and not rel.startswith(ENGINE_ONLY) and not rel.endswith(SKIPPED):
            out.add(rel)
    return out


def file_checks(a: Path, b: Path) -> list[Check]:
    """The same files in both run folders; every image the same pixels."""
    names = Check("run folder: the same files (but the Ray engine's own)", "exact")
    fa, fb = files(a), files(b)
    names.count = len(fa)
    for rel in sorted(fa ^ fb):
        names.mismatches.append(f"{rel}: only in {'local' if rel in fa else 'ray'}")
    images = Check("images (plots, panels, failure-mode pages, thumbnails)", f"{PIXEL_TOL} levels")
    for rel in sorted(fa & fb):
        if not rel.endswith((".png", ".jpg")):
            continue
        with Image.open(a / rel) as ia, Image.open(b / rel) as ib:
            x, y = np.asarray(ia.convert("RGBA")), np.asarray(ib.convert("RGBA"))
        images.count += 1
        if x.shape != y.shape:
            images.mismatches.append(f"{rel}: size {x.shape} != {y.shape}")
            continue
        diff = int(np.abs(x.astype(np.int16) - y).max())
        images.largest = max(images.largest, diff)
        if diff > PIXEL_TOL:
            share = float((np.abs(x.astype(np.int16) - y) > PIXEL_TOL).mean())
            images.mismatches.append(f"{rel}: {diff} levels, {share:.2%} of the values")
    return [names, images]


def compare(a: Path, b: Path) -> list[Check]:
    """Every check of the local run folder ``a`` against the Ray run folder ``b``."""
    return [
        *prediction_checks(a, b),
        *metrics_checks(a, b),
        *explanation_checks(a, b),
        *html_checks(a, b),
        *file_checks(a, b),
    ]


def table(checks: Sequence[Check]) -> Iterator[str]:
    yield "| compared | items | largest difference | tolerance | result |"
    yield "|---|---|---|---|---|"
    for c in checks:
        result = "same" if not c.mismatches else f"**{len(c.mismatches)} mismatches**"
        yield f"| {c.what} | {c.count} | {c.largest:.1e} | {c.tolerance} | {result} |"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lite0")
    p.add_argument("--data", type=Path, default=None, help="class folders or a CSV path,label")
    p.add_argument(
        "--augmented",
        type=int,
        default=0,
        help="instead, this many augmented images made from the dev set (bench_analyze's set)",
    )
    p.add_argument("--top-errors", type=int, default=8)
    p.add_argument("--methods", default="gradcam,smoothgrad")
    p.add_argument("--samples", type=int, default=8, help="SmoothGrad's noisy copies")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    p.add_argument("--show", type=int, default=5, help="mismatches printed per check")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    load_before = load_average()
    started = dt.datetime.now(dt.timezone.utc)
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        # runs already there would be resumed, and the comparison would read stale reports
        log.error("--keep %s is not empty; give a new folder", args.keep)
        return 2
    with tempfile.TemporaryDirectory(prefix="compare-engines-") as tmp:
        work = args.keep or Path(tmp)
        if args.augmented:
            from bench_analyze import make_set, read_dev

            data = make_set(read_dev(default_data()), args.augmented, work / "set")
        else:
            data = args.data or default_data() / "labels.csv"
        spec = functools.partial(load_model, args.model)
        methods = {m: {} for m in args.methods.split(",")}
        for name in ("smoothgrad", "vargrad"):
            if name in methods:
                methods[name] = {"samples": args.samples}
        common: dict[str, Any] = {
            "methods": methods,
            "top_errors": args.top_errors,
            "batch_size": args.batch,
            "limit": args.limit,
            "progress": False,
        }
        t0 = time.perf_counter()
        analyze(spec(), data, work / "local", **common)
        t_local = time.perf_counter() - t0
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            analyze(spec(), data, work / "ray", engine="ray", model_spec=spec, **common)
            t_ray = time.perf_counter() - t0
            resources = ray.cluster_resources()
        finally:
            ray.shutdown()
        checks = compare(work / "local", work / "ray")
        n = next(c.count for c in checks if c.what.startswith("predictions: path"))
    bad = [c for c in checks if c.mismatches]
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC; commit {git_commit()}")
    print(machine_line("cpu", python=True))
    print(f"- 1-minute load average: {load_before:.2f} before, {load_average():.2f} after")
    print(f"- command: `{command_line(argv, script='benchmarks/compare_engines.py')}`")
    print(
        f"- {args.model}, {n} images ("
        + (f"bench_analyze's augmented set from {default_data()}" if args.augmented else str(data))
        + "), "
        f"methods {json.dumps(methods)}, top errors {args.top_errors}, batch {args.batch}; "
        f"local {t_local:.0f} s, ray {t_ray:.0f} s (Ray: {resources.get('CPU', 0):g} CPUs)"
    )
    print()
    for line in table(checks):
        print(line)
    print()
    for c in bad:
        print(f"{c.what}: {len(c.mismatches)} mismatches, e.g.")
        for m in c.mismatches[: args.show]:
            print(f"  {m}")
    print("SAME REPORT" if not bad else f"MISMATCH in {len(bad)} of {len(checks)} checks")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
