"""The explorer's web application: pages, maps against the public API, refusals, concurrency."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import posixpath
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import httpx
from starlette.testclient import TestClient

from convlens.methods import get_method
from convlens.serve import background
from convlens.serve.app import create_app
from convlens.serve.explorer import Explorer
from tests.helpers.runs import TinyRun, tiny_run

# a job thread does not catch warnings (catch_warnings is process-wide, not thread-safe), so the
# strict "error" filter would turn a method's blank-map warning into the job's failure; the
# page gets the flag as a note instead (test_maps_report_blank_flags_as_notes)
POST_HEADER = {"X-Convlens": "1"}
pytestmark = [
    pytest.mark.filterwarnings("ignore::convlens.errors.BlankMapWarning"),
    pytest.mark.filterwarnings("ignore::convlens.errors.NonFiniteMapWarning"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture
def explorer(run: TinyRun) -> Iterator[Explorer]:
    ex = Explorer(run.model(), run.run, max_upload_bytes=200_000)
    yield ex
    ex.close()


@pytest.fixture
def client(explorer: Explorer) -> Iterator[TestClient]:
    with TestClient(create_app(explorer), base_url="http://127.0.0.1", headers=POST_HEADER) as c:
        yield c


def pixels(data_url: str) -> np.ndarray:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def mistake(explorer: Explorer) -> str:
    return next(p.id for p in explorer.predictions if p.correct is False)


def test_run_view_shows_the_report_with_live_links(client: TestClient, explorer: Explorer) -> None:
    page = client.get("/", follow_redirects=True)
    assert page.status_code == 200 and page.url.path == "/run/report/index.html"
    text = page.text
    for section in ("summary", "pairs", "classes", "images", "mistakes"):
        assert f'id="{section}"' in text
    assert "Live explorer" in text
    wrong = mistake(explorer)
    assert f'href="/image/{wrong}.html"' in text  # the mistakes gallery links to live pages
    assert '"pages":"/image/"' in text  # so does every row of the images table
    thumb = client.get(f"/run/thumbs/{wrong}.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_image_page_and_api(client: TestClient, explorer: Explorer) -> None:
    i = mistake(explorer)
    page = client.get(f"/image/{i}.html")
    assert page.status_code == 200 and "why not the true class?" in page.text
    info = client.get(f"/api/images/{i}").json()
    p = explorer.predictions[[q.id for q in explorer.predictions].index(i)]
    assert [t["index"] for t in info["top5"]] == list(p.top5)
    assert info["label"] == p.label
    layers = client.get("/api/layers").json()["layers"]
    assert [(r["name"], r["shape"]) for r in layers][:3] == [
        ("0", "4x32x32"),
        ("1", "4x32x32"),
        ("2", "6x16x16"),
    ]
    names = {m["name"]: m for m in client.get("/api/methods").json()["methods"]}
    assert names["occlusion"]["long"] and "patch" in names["occlusion"]["options"]
    assert client.get("/api/classes?q=MUG").json()["classes"] == [
        {"index": 2, "name": "coffee mug"}
    ]
    png = client.get(f"/api/images/{i}/input.png")
    assert Image.open(io.BytesIO(png.content)).size == (32, 32)


@pytest.mark.parametrize(
    ("method", "target", "layer", "options"),
    [
        ("gradcam", "pred", None, {}),
        ("gradcam", "true", "0", {}),
        ("gradcam", "coffee mug", "2", {}),
        ("occlusion", 1, None, {"patch": "8", "stride": "4"}),
        ("saliency", "true", None, {}),
    ],
)
def test_maps_equal_the_public_api(
    client: TestClient,
    explorer: Explorer,
    run: TinyRun,
    method: str,
    target: Any,
    layer: str | None,
    options: dict[str, str],
) -> None:
    i = mistake(explorer)
    r = client.post(
        "/api/explain",
        json={"image": i, "method": method, "target": target, "layer": layer, "options": options},
    ).json()
    assert r["state"] == "done", r
    p = explorer.predictions[[q.id for q in explorer.predictions].index(i)]
    want = {"pred": p.pred, "true": p.label, "coffee mug": 2}.get(target, target)
    assert r["target"] == want
    model = run.model()
    x = model.load_images([p.path])
    typed = {k: int(v) for k, v in options.items()}
    exp = get_method(method, **typed)(model, x, want, layer=layer)
    assert np.array_equal(pixels(r["map"]), np.asarray(exp.overlay(0, 0).convert("RGB")))
    if layer is not None:
        assert r["layer"] == layer


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"method": "nope"}, "unknown method"),
        ({"method": "occlusion", "options": {"patchy": "3"}}, "no option 'patchy'"),
        ({"method": "occlusion", "options": {"patch": "-3"}}, "patch"),
        ({"method": "gradcam", "layer": "../../etc"}, "no layer named"),
        ({"method": "gradcam", "target": "zebra"}, "zebra"),
        ({"method": "gradcam", "target": 7}, "out of range"),
        ({"method": "gradcam", "image": "../../etc/passwd"}, "no image"),
        ({"method": "gradcam", "options": {"patch": {"__class__": 1}}}, "text"),
    ],
)
def test_bad_requests_are_refused_before_anything_runs(
    client: TestClient, explorer: Explorer, body: dict[str, Any], words: str
) -> None:
    body = {"image": mistake(explorer), **body}
    r = client.post("/api/explain", json=body)
    assert r.status_code == 400
    message = r.json()["error"]
    assert words in message and "\n" not in message
    assert explorer.jobs.computations == 0


def test_files_outside_the_folder_are_refused(
    client: TestClient, explorer: Explorer, run: TinyRun, tmp_path: Path
) -> None:
    secret = run.root / "secret.png"
    Image.new("RGB", (40, 40)).save(secret)
    link = run.run / "thumbs" / "link.png"
    link.unlink(missing_ok=True)
    os.symlink(secret, link)
    try:
        for url in (
            "/run/..%2fsecret.png",
            "/run/%2e%2e/secret.png",
            "/run/thumbs/..%2f..%2fsecret.png",
            "/run/" + urllib.parse.quote(str(secret), safe=""),
            "/run/thumbs/link.png",  # a link out of the folder
            "/run/predictions.sqlite",  # inside, but not an image
            "/run/metrics.json",
        ):
            assert client.get(url).status_code == 404, url
        assert client.get(f"/run/thumbs/{mistake(explorer)}.jpg").status_code == 200
        # a literal ../ that no client library tidies away first
        with background(explorer) as url:
            host, port = urllib.parse.urlsplit(url).netloc.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/run/../secret.png")
            assert conn.getresponse().status == 404
            conn.close()
    finally:
        link.unlink()
        secret.unlink()


def png_bytes(size: tuple[int, int] = (40, 40)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_uploads(client: TestClient, explorer: Explorer) -> None:
    big = b"\x89PNG" + b"0" * 200_001
    r = client.post("/api/upload", content=big)
    assert r.status_code == 413 and "limit of 200000 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        for _ in range(30):
            yield b"0" * 10_000

    assert client.post("/api/upload", content=chunks()).status_code == 413
    r = client.post("/api/upload", content=b"GIF89a not really", headers={"X-Filename": "x.gif"})
    assert r.status_code == 400 and "cannot read image 'x.gif'" in r.json()["error"]
    assert client.post("/api/upload", content=b"").status_code == 400
    r = client.post(
        "/api/upload", content=png_bytes(), headers={"X-Filename": "..%2F..%2Fmy%20cat.png"}
    )
    assert r.status_code == 200
    up = r.json()
    assert up["name"] == "my cat.png" and up["url"] == f"/image/{up['id']}.html"
    assert client.get(up["url"]).status_code == 200
    m = client.post("/api/explain", json={"image": up["id"], "method": "gradcam"}).json()
    assert m["state"] == "done" and m["target"] == explorer.top5(up["id"])[0][0]
    with pytest.raises(Exception, match="no true class"):
        explorer.target_index(up["id"], "true")


def test_long_job_progress_and_cancel(
    client: TestClient, explorer: Explorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convlens.serve.explorer import SERVER_CAPS

    monkeypatch.setitem(SERVER_CAPS, "masks", 10**6)  # a job long enough to cancel
    i = mistake(explorer)
    model = explorer.model.net
    flags = [p.requires_grad for p in model.parameters()]
    body = {
        "image": i,
        "method": "rise",
        "options": {"masks": "200000", "batch_size": "4"},
        "wait": 0,
    }
    start = time.perf_counter()
    r = client.post("/api/explain", json=body).json()
    while not r["progress"]:
        r = client.get(f"/api/jobs/{r['job']}?state={r['state']}&progress={r['progress'] or ''}")
        r = r.json()
    # within a second on an idle machine (benchmarks/bench_serve.py); generous here, where the
    # suite may share the CPU with other processes
    assert time.perf_counter() - start < 10.0
    assert r["state"] == "running" and 0 < r["progress"] < 1
    assert client.post(f"/api/jobs/{r['job']}/cancel").status_code == 200
    while r["state"] == "running":
        r = client.get(f"/api/jobs/{r['job']}?state=running&progress={r['progress']}").json()
    assert r["state"] == "cancelled"
    assert [p.requires_grad for p in model.parameters()] == flags
    # asked again, it is computed anew (cancelled jobs are not cached)
    again = client.post("/api/explain", json={**body, "wait": 0}).json()
    assert again["job"] != r["job"]
    client.post(f"/api/jobs/{again['job']}/cancel")
    assert client.get("/api/jobs/j999").status_code == 404


def test_ten_concurrent_requests(explorer: Explorer) -> None:
    i = mistake(explorer)
    same = {"image": i, "method": "scorecam", "target": "true"}
    different = [
        {"image": i, "method": m, "target": t}
        for m in ("gradcam", "saliency")
        for t in ("pred", "true", 1, 2, "dog")
    ]
    with (
        background(explorer) as url,
        httpx.Client(base_url=url, timeout=60, headers=POST_HEADER) as http,
    ):

        def ask(body: dict[str, Any]) -> dict[str, Any]:
            r = http.post("/api/explain", json={**body, "wait": 10})
            assert r.status_code == 200
            return r.json()

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(ask, [same] * 10))
        assert {a["state"] for a in answers} == {"done"}
        assert len({a["job"] for a in answers}) == 1
        assert len({a["map"] for a in answers}) == 1
        assert explorer.jobs.computations == 1  # computed once
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(ask, different))
        assert {a["state"] for a in answers} == {"done"}
        # "dog" is class 1 and "pred"/"true" are one of 0..2: fewer maps than requests
        keys = {(b["method"], a["target"]) for b, a in zip(different, answers, strict=True)}
        assert explorer.jobs.computations == 1 + len(keys)
        assert len({a["job"] for a in answers}) == len(keys)


def test_image_folder(run: TinyRun) -> None:
    ex = Explorer(run.model(), run.data)
    try:
        with TestClient(create_app(ex), base_url="http://127.0.0.1", headers=POST_HEADER) as c:
            page = c.get("/")
            assert page.status_code == 200
            assert page.text.count('class="card"') == 9
            i = next(iter(ex.images))
            assert c.get(f"/image/{i}.html").status_code == 200
            r = c.post("/api/explain", json={"image": i, "method": "gradcam"}).json()
            assert r["state"] == "done"
            assert c.get("/run/thumbs/x.jpg").status_code == 404  # not a run: no files
    finally:
        ex.close()


def test_feature_browser_against_a_hooked_forward_pass(
    client: TestClient, explorer: Explorer, run: TinyRun
) -> None:
    r = client.post("/api/features/channel", json={"layer": "2", "channel": 0})
    assert r.status_code == 400 and "scan it first" in r.json()["error"]
    scan = client.post("/api/features/scan", json={"layer": "2", "wait": 30}).json()
    assert scan["state"] == "done" and scan["scanned"] == 9 and scan["shape"] == "6x16x16"
    # independently: each image's per-channel maximum of layer 2, by a forward hook
    model = run.model()
    seen: list[torch.Tensor] = []
    handle = model.net[2].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            for p in explorer.predictions:
                model.net(model.load_images([p.path]))
    finally:
        handle.remove()
    peaks = torch.cat(seen).amax(dim=(2, 3))  # (images, channels)
    for row in scan["channels"]:
        assert row["value"] == pytest.approx(float(peaks[:, row["channel"]].max()), rel=1e-5)
    c = scan["channels"][0]["channel"]
    got = client.post("/api/features/channel", json={"layer": "2", "channel": c, "wait": 30})
    ex = got.json()
    assert ex["state"] == "done" and ex["channel"] == c
    values = [e["value"] for e in ex["examples"]]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(sorted(peaks[:, c].tolist(), reverse=True), rel=1e-5)
    assert all(e["image"] in explorer.images for e in ex["examples"])
    assert all(pixels(e["patch"]).size and pixels(e["projection"]).size for e in ex["examples"])
    bad = client.post("/api/features/channel", json={"layer": "2", "channel": 6})
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]
    assert client.post("/api/features/scan", json={"layer": "zz"}).status_code == 400


def test_a_run_of_another_model_is_refused(run: TinyRun) -> None:
    from convlens.errors import InputError, RunFolderError
    from convlens.models.base import ConvlensModel
    from convlens.models.classes import ClassList

    model = run.model()
    other = ConvlensModel(
        net=model.net, preprocess=model.preprocess, classes=ClassList(("a", "b", "c", "d"))
    )
    with pytest.raises(RunFolderError, match=r"3 classes .* has 4; give the run's model"):
        Explorer(other, run.run)
    with pytest.raises(InputError, match="is not a folder"):
        Explorer(model, run.root / "net.py")


def test_warm_up_makes_the_layer_table(explorer: Explorer) -> None:
    explorer.warm_up()
    assert explorer._layers is not None and explorer.jobs.computations == 0


def test_a_job_leaves_the_process_warning_state_alone(explorer: Explorer) -> None:
    """``warnings.catch_warnings`` is process-wide and not thread-safe: a job thread using it
    while a request thread loads an image (which uses it too) can leave a dead ``showwarning``
    and an ``always`` filter behind. So no job touches the warning state while it runs."""
    import warnings

    before = (warnings.showwarning, list(warnings.filters))
    seen: list[tuple[object, list[object]]] = []

    def spy(module: torch.nn.Module, args: object, out: object) -> None:
        seen.append((warnings.showwarning, list(warnings.filters)))

    handle = explorer.model.net.register_forward_hook(spy)
    try:
        i = mistake(explorer)
        job = explorer.request_map(i, "gradcam")
        assert job.wait(60) and job.state == "done", job.error
    finally:
        handle.remove()
    assert seen and all(s == before for s in seen)
    assert (warnings.showwarning, list(warnings.filters)) == before
    assert isinstance(job.result["notes"], list)


def test_maps_report_blank_flags_as_notes() -> None:
    from convlens.serve.explorer import _notes

    assert _notes({"blank": torch.tensor([[True]]), "nonfinite": torch.tensor([[False]])}) == [
        "the map is all zero (nothing to show)"
    ]
    assert _notes({"blank": torch.tensor([[False]])}) == []


def test_foreign_hosts_and_cross_site_posts_are_refused(explorer: Explorer) -> None:
    """DNS rebinding (a foreign Host header) and cross-site POSTs (no X-Convlens header, or a
    form's text/plain body) are refused before anything runs."""
    i = mistake(explorer)
    body = {"image": i, "method": "gradcam"}
    # without "with": no lifespan, so the explorer stays open for the next client
    evil = TestClient(create_app(explorer), base_url="http://evil.example")
    assert evil.get("/api/methods").status_code == 400
    v6 = TestClient(create_app(explorer, "::1"), base_url="http://[::1]:8000")
    assert v6.get("/api/methods").status_code == 200
    lan = TestClient(create_app(explorer, "10.1.2.3"), base_url="http://10.1.2.3:8000")
    assert lan.get("/api/methods").status_code == 200
    assert evil.get("/api/methods", headers={"Host": "10.1.2.3"}).status_code == 400
    with TestClient(create_app(explorer), base_url="http://127.0.0.1") as c:
        assert c.get("/api/methods").status_code == 200
        assert c.post("/api/explain", json=body).status_code == 403
        assert c.post("/api/upload", content=png_bytes()).status_code == 403
        assert c.post("/api/features/scan", json={"layer": "x"}).status_code == 403
        as_form = c.post(
            "/api/explain",
            content=json.dumps(body),
            headers={**POST_HEADER, "Content-Type": "text/plain"},
        )
        assert as_form.status_code == 415
        assert explorer.jobs.computations == 0
        ok = c.post("/api/explain", json={**body, "wait": 10}, headers=POST_HEADER)
        assert ok.status_code == 200 and ok.json()["state"] == "done"


def test_uploads_and_inputs_are_bounded(
    explorer: Explorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convlens.serve.explorer as ex_module

    monkeypatch.setattr(ex_module, "MAX_UPLOADS", 3)
    monkeypatch.setattr(ex_module, "MAX_INPUTS", 2)
    records = [explorer.add_upload(png_bytes((40 + k, 40)), f"{k}.png") for k in range(5)]
    kept = [k for k in explorer.images if k.startswith("u")]
    assert kept == [r.id for r in records[2:]]
    assert sorted(p.name for p in Path(explorer._uploads.name).iterdir()) == sorted(
        f"{r.id}.upload" for r in records[2:]
    )
    for r in records[2:]:
        explorer.input(r.id)
    assert list(explorer._inputs) == [r.id for r in records[3:]]


def test_the_same_upload_at_once_from_many_threads(explorer: Explorer) -> None:
    data = png_bytes((44, 44))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda k: explorer.add_upload(data, f"{k}.png"), range(16)))
    assert len({r.id for r in records}) == 1
    assert [p.name for p in Path(explorer._uploads.name).iterdir()] == [f"{records[0].id}.upload"]
    assert explorer.input(records[0].id).shape[-1] == 32


def test_failure_mode_pages_of_the_run_view(tmp_path: Path) -> None:
    """The run view links each failure mode to the report's page of it: those pages (and the
    images they show) are served; other HTML of the folder is not."""
    made = tiny_run(tmp_path, failure_modes=True)
    ex = Explorer(made.model(), made.run)
    (made.run / "notes.html").write_text("<p>not a report page</p>")
    with TestClient(create_app(ex), base_url="http://127.0.0.1", headers=POST_HEADER) as c:
        index = c.get("/run/report/index.html").text
        links = sorted(set(re.findall(r'href="(failure_modes/mode-\d+\.html)"', index)))
        assert links, "the tiny run has no failure modes"
        for link in links:
            page = c.get(f"/run/report/{link}")
            assert page.status_code == 200, link
            assert page.headers["content-type"].startswith("text/html")
            base = f"/run/report/{link}".rsplit("/", 1)[0]
            for src in re.findall(r'src="(\.\./\.\./[^"]+)"', page.text):
                url = posixpath.normpath(f"{base}/{src}")
                assert c.get(url).status_code == 200, url
        assert c.get("/run/notes.html").status_code == 404
        assert c.get("/run/report/%2e%2e/notes.html").status_code == 404


def test_huge_options_are_refused_before_anything_runs(
    client: TestClient, explorer: Explorer
) -> None:
    i = mistake(explorer)
    for method, option in (("rise", "masks"), ("smoothgrad", "samples"), ("intgrad", "steps")):
        r = client.post(
            "/api/explain", json={"image": i, "method": method, "options": {option: 10**12}}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "\n" not in error and option in error and "at most 4096" in error
    assert explorer.jobs.computations == 0


def test_running_out_of_memory_is_one_line(
    explorer: Explorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from convlens.methods.base import Method

    def no_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate"
        )

    monkeypatch.setattr(Method, "__call__", no_memory)
    job = explorer.request_map(mistake(explorer), "gradcam")
    assert job.wait(30) and job.state == "failed"
    assert job.error is not None and "\n" not in job.error and "smaller options" in job.error


def test_no_layer_and_the_default_layer_share_one_map(explorer: Explorer) -> None:
    i = mistake(explorer)
    first = explorer.request_map(i, "gradcam")
    assert first.wait(30) and first.state == "done", first.error
    named = explorer.request_map(i, "gradcam", layer=first.result["layer"])
    assert named is first and explorer.jobs.computations == 1


def test_long_polls_hold_no_worker_thread(
    client: TestClient, explorer: Explorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for a job happens on the event loop, not by blocking a threadpool thread."""
    from convlens.serve.jobs import Job

    def blocking(*args: object) -> None:
        raise AssertionError("a request blocked a worker thread waiting for a job")

    monkeypatch.setattr(Job, "wait", blocking)
    monkeypatch.setattr(Job, "wait_change", blocking)
    i = mistake(explorer)
    r = client.post("/api/explain", json={"image": i, "method": "saliency", "wait": 10})
    assert r.status_code == 200 and r.json()["state"] == "done"
    r = client.get(f"/api/jobs/{r.json()['job']}?state=running&progress=0").json()
    assert r["state"] == "done"
