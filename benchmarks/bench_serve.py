"""Benchmark the live explorer (``convlens serve``) on the default model and the dev images.

Starts the explorer in this process (uvicorn in a thread, on a free loopback port) over the dev
image folder and measures, after one warm-up request:

1. the Grad-CAM round trip over HTTP: ``POST /api/explain`` until the JSON answer holding the
   map as a PNG ``data:`` URL has arrived and the PNG is decoded; for a new image (its file read
   and preprocessed in the request) and for another class of an image already shown;
2. the same in headless Chromium (when Playwright and ``/usr/bin/chromium`` are there): from the
   click on the third of the top-5 classes to its map's ``load`` event;
3. occlusion (default options): the time until the first progress report reaches the client,
   the whole computation, and how long a cancel takes to stop it.

Prints a markdown section; ``--out FILE`` also writes it there (``benchmarks/RESULTS_SERVE.md``).

Example:
    python benchmarks/bench_serve.py --images 10
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

import convlens
from convlens.serve import background
from convlens.serve.explorer import Explorer

import _common as common

TITLE = "# convlens live explorer benchmarks"
INTRO = (
    "Produced by `benchmarks/bench_serve.py`: the explorer (`convlens serve`) in-process on a "
    "free loopback port, the default model, the dev images. Goals (issue 19): a warm Grad-CAM "
    "round trip under 300 ms, occlusion progress within 1 s. Each run adds a section."
)


def _explain(http: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    r = http.post("/api/explain", json={**body, "wait": 10})
    data = r.json()
    if data.get("state") != "done":
        raise SystemExit(f"request failed: {data}")
    Image.open(io.BytesIO(base64.b64decode(data["map"].partition(",")[2]))).load()
    return time.perf_counter() - start, data


def http_round_trips(http: httpx.Client, ids: list[str]) -> dict[str, list[float]]:
    """Seconds per Grad-CAM request: new images, then another class of each; and of the
    latter, the job's time on the server (image, method, PNG) and the method's alone."""
    out: dict[str, list[float]] = {
        "new image": [],
        "another class": [],
        "another class, job on the server": [],
        "another class, Grad-CAM itself": [],
    }
    for i in ids:
        t, _ = _explain(http, {"image": i, "method": "gradcam"})
        out["new image"].append(t)
        second = http.get(f"/api/images/{i}").json()["top5"][1]["index"]
        t, data = _explain(http, {"image": i, "method": "gradcam", "target": second})
        out["another class"].append(t)
        out["another class, job on the server"].append(data["seconds"])
        out["another class, Grad-CAM itself"].append(data["method_seconds"])
    return out


def browser_round_trips(url: str, ids: list[str]) -> list[float] | None:
    """Seconds from the click on the third of the top-5 classes to its map's load event."""
    import shutil

    if shutil.which("chromium") is None:
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    out = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu"],
        )
        page = browser.new_page()
        for i in ids:
            page.goto(f"{url}image/{i}.html")
            page.wait_for_selector('.map[data-method="gradcam"][data-state="done"]')
            seconds = page.evaluate(
                """() => new Promise(resolve => {
                    const img = document.querySelector('.map[data-method="gradcam"] img');
                    const t0 = performance.now();
                    img.addEventListener("load", () => resolve((performance.now() - t0) / 1000),
                                         {once: true});
                    document.querySelectorAll("#top5 .bar")[2].click();
                })"""
            )
            out.append(float(seconds))
        browser.close()
    return out


def occlusion_progress(http: httpx.Client, i: str) -> dict[str, float]:
    """Seconds to the first progress report above 0 (after the first chunk), to the end, and
    from a cancel to the stop."""
    start = time.perf_counter()
    r = http.post("/api/explain", json={"image": i, "method": "occlusion", "wait": 0}).json()
    first = None
    shown = time.perf_counter() - start  # the page shows its progress bar from this answer
    while r["state"] not in ("done", "failed", "cancelled"):
        if first is None and r["progress"]:
            first = time.perf_counter() - start
        q = f"?state={r['state']}&progress={'' if r['progress'] is None else r['progress']}"
        r = http.get(f"/api/jobs/{r['job']}{q}").json()
    total = time.perf_counter() - start
    # again with another target, cancelled at the first progress report
    r = http.post(
        "/api/explain", json={"image": i, "method": "occlusion", "target": 1, "wait": 0}
    ).json()
    while not r["progress"]:
        r = http.get(f"/api/jobs/{r['job']}?state={r['state']}&progress=").json()
    asked = time.perf_counter()
    http.post(f"/api/jobs/{r['job']}/cancel")
    while r["state"] == "running":
        r = http.get(f"/api/jobs/{r['job']}?state=running&progress={r['progress']}").json()
    return {
        "progress bar shown (job running)": shown,
        "first progress above 0 (one chunk done)": first if first is not None else float("nan"),
        "whole map": total,
        "cancel to stop": time.perf_counter() - asked,
    }


def _ms(values: list[float]) -> str:
    return (
        f"{1000 * statistics.median(values):.0f} ms (min {1000 * min(values):.0f}, "
        f"max {1000 * max(values):.0f}, n={len(values)})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="image folder (dev images)")
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="append the section here")
    args = parser.parse_args(argv)
    data = args.data or common.default_data()
    load_before = common.load_average()
    model = convlens.load_model(args.model)
    explorer = Explorer(model, data)
    ids = list(explorer.images)[: args.images + 1]
    with (
        background(explorer) as url,
        httpx.Client(base_url=url, timeout=120, headers={"X-Convlens": "1"}) as http,
    ):
        _explain(http, {"image": ids[0], "method": "gradcam"})  # warm-up
        rounds = http_round_trips(http, ids[1:])
        occ = occlusion_progress(http, ids[1])
        browser = browser_round_trips(url, ids[1:])
    now = dt.datetime.now(dt.timezone.utc)
    heading = common.section_heading(
        f"{now:%Y-%m-%d %H:%M}", torch.device("cpu"), label=f"live explorer, {args.model}"
    )
    lines = [
        heading,
        "",
        common.machine_line(torch.device("cpu")),
        common.load_line((load_before, common.load_average())),
        f"- `{common.command_line(script='benchmarks/bench_serve.py')}`",
        "",
        "| measurement | time |",
        "|---|---|",
        *(f"| Grad-CAM over HTTP, {k} | {_ms(v)} |" for k, v in rounds.items()),
    ]
    if browser:
        lines.append(f"| Grad-CAM in Chromium, click to map shown (3rd class) | {_ms(browser)} |")
    lines += [f"| occlusion, {k} | {1000 * v:.0f} ms |" for k, v in occ.items()]
    section = "\n".join(lines) + "\n"
    sys.stdout.write(section)
    if args.out is not None:
        common.write_section(args.out, heading, section, title=TITLE, intro=INTRO)


if __name__ == "__main__":
    main()
