"""The explorer's web application (Starlette; imported only by ``convlens serve`` and its tests).

Routes:

- ``GET /``: the run view (redirect to ``/run/report/index.html``) or the image folder's
  gallery; ``GET /image/ID.html``: the live page of an image; ``GET /upload.html``.
- ``GET /run/PATH``: files of the run folder (thumbnails, plots, explanation panels, and the
  report's HTML pages of failure modes and images under ``report/``); only image files and
  those pages, only under the folder (anything resolving outside it is refused with 404).
- ``GET /api/images/ID`` (name, label, top-5), ``GET /api/images/ID/input.png``,
  ``GET /api/methods``, ``GET /api/layers``, ``GET /api/classes?q=TEXT``.
- ``POST /api/explain`` ``{"image", "method", "target", "layer", "options"}``: the map's job,
  answered when done or after ``wait`` seconds (default 2) with its state and progress;
  ``GET /api/jobs/ID?state=S&progress=P`` answers once the job differs from that (or after a
  second); ``POST /api/jobs/ID/cancel``.
- ``GET /features.html``: the live feature browser; ``POST /api/features/scan``
  ``{"layer"}``: the job ranking each channel's strongest activations over the images;
  ``POST /api/features/channel`` ``{"layer", "channel"}``: the job projecting one channel's
  top activations into pixel space, with their patches (both answered like ``/api/explain``).
- ``POST /api/upload``: the image file as the request body (``X-Filename`` header for its
  name), at most ``max_upload_bytes`` (413 beyond), read by the validated image loader.

Errors are JSON ``{"error": "one line"}`` with status 400 (bad request), 403, 404, 413 or 415.

Against DNS rebinding and cross-site requests from other web pages: a request whose ``Host`` is
not the loopback name or the address listened on is refused (400, ``TrustedHostMiddleware``);
every ``POST`` must carry the header ``X-Convlens: 1`` (403 otherwise; a page of another site
cannot send it without a CORS preflight, which this server never grants), and the JSON ones
``Content-Type: application/json`` (415 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from convlens.errors import ConvlensError, InputError
from convlens.serve import pages
from convlens.serve.explorer import Explorer

__all__ = ["CSRF_HEADER", "allowed_hosts", "create_app"]

log = logging.getLogger(__name__)

_FILE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_NO_STORE = {"Cache-Control": "no-store"}
CSRF_HEADER = "X-Convlens"
"""The header every POST carries (value ``1``): a cross-site form or simple request cannot."""
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str) -> list[str]:
    """The ``Host`` header values served when listening on ``host``: the loopback names and
    ``host`` itself (bracketed when IPv6); any, when listening on every address (``0.0.0.0``,
    ``::``), whose names cannot be known (the exposure warning says so)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return list(dict.fromkeys((*_LOOPBACK_NAMES, shown.lower())))


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread (it may read files or run the model)."""
    return await run_in_threadpool(fn, *args, **kwargs)


async def _until(done: Any, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``done()`` to be true, on the event loop: a long poll
    holds no worker thread (the pool's threads are for file reads and the model)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


def create_app(explorer: Explorer, host: str = "127.0.0.1") -> Starlette:
    """The web application of ``explorer`` listening on ``host`` (which names the ``Host``
    headers accepted, see :func:`allowed_hosts`); ``explorer`` is closed when the application
    shuts down."""

    async def guarded(request: Request, handler: Any, json_body: bool) -> Response:
        if request.method == "POST":
            if request.headers.get(CSRF_HEADER) != "1":
                return _error(f"POST requests must carry the header {CSRF_HEADER}: 1", 403)
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if json_body and kind != "application/json":
                return _error("the request body must be JSON (Content-Type: application/json)", 415)
        try:
            return await handler(request)
        except ConvlensError as exc:
            return _error(str(exc))

    def route(path: str, handler: Any, methods: tuple[str, ...] = ("GET",)) -> Route:
        json_body = "POST" in methods and handler is not upload and handler is not cancel

        async def endpoint(request: Request) -> Response:
            return await guarded(request, handler, json_body)

        return Route(path, endpoint, methods=list(methods))

    cached: list[str] = []

    async def home(request: Request) -> Response:
        if explorer.is_run:
            return RedirectResponse("/run/report/index.html", status_code=307)
        return HTMLResponse(await _call(pages.folder_page, explorer))

    async def run_index(request: Request) -> Response:
        if not explorer.is_run:
            return _error("not an analysis run", 404)
        if not cached:  # the run does not change while it is served
            cached.append(await _call(pages.run_page, explorer))
        return HTMLResponse(cached[0])

    async def run_file(request: Request) -> Response:
        if explorer.root is None or not explorer.is_run:
            return _error("no such file", 404)
        rel = request.path_params["path"]
        path = (explorer.root / rel).resolve()
        kind = _FILE_TYPES.get(path.suffix.lower())
        # the report's own pages (a failure mode's, an image's): HTML under RUN_DIR/report/
        if path.suffix.lower() == ".html" and path.is_relative_to(explorer.root / "report"):
            kind = "text/html; charset=utf-8"
        if kind is None or not path.is_relative_to(explorer.root) or not path.is_file():
            return _error("no such file", 404)
        return FileResponse(path, media_type=kind)

    async def image_page(request: Request) -> Response:
        i = request.path_params["id"]
        explorer.record(i)
        return HTMLResponse(await _call(pages.image_page, explorer, i))

    async def upload_page(request: Request) -> Response:
        return HTMLResponse(pages.upload_page(explorer))

    async def image_info(request: Request) -> Response:
        return JSONResponse(await _call(explorer.image_info, request.path_params["id"]))

    async def input_png(request: Request) -> Response:
        png = await _call(explorer.input_png, request.path_params["id"])
        return Response(png, media_type="image/png")

    async def methods(request: Request) -> Response:
        return JSONResponse({"methods": explorer.methods()})

    async def layers(request: Request) -> Response:
        return JSONResponse({"layers": await _call(explorer.layers)})

    async def classes(request: Request) -> Response:
        return JSONResponse({"classes": explorer.search_classes(request.query_params.get("q", ""))})

    async def explain(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error("the request body must be JSON")
        if not isinstance(body, dict):
            return _error("the request body must be a JSON object")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            return _error("options must be an object of option: value")
        job = await _call(
            explorer.request_map,
            str(body.get("image", "")),
            str(body.get("method", "")),
            body.get("target", "pred"),
            str(body.get("layer") or "") or None,
            options,
        )
        wait = _seconds(body.get("wait"), 2.0)
        await _until(job.finished.is_set, wait)
        return JSONResponse(explorer.job_json(job), headers=_NO_STORE)

    async def job_status(request: Request) -> Response:
        job = explorer.jobs.get(request.path_params["id"])
        if job is None:
            return _error("no such job", 404)
        q = request.query_params
        progress = q.get("progress")
        try:
            seen_progress = float(progress) if progress else None
        except ValueError:
            seen_progress = None
        seen = (q.get("state", ""), seen_progress)
        if seen[0]:
            await _until(lambda: (job.state, job.progress) != seen, 1.0)
        return JSONResponse(explorer.job_json(job), headers=_NO_STORE)

    async def cancel(request: Request) -> Response:
        job = explorer.jobs.cancel(request.path_params["id"])
        if job is None:
            return _error("no such job", 404)
        return JSONResponse(job.status())

    async def upload(request: Request) -> Response:
        limit = explorer.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(f"upload refused: larger than the limit of {limit} bytes", 413)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(f"upload refused: larger than the limit of {limit} bytes", 413)
            chunks.append(chunk)
        if not size:
            return _error("the upload is empty: send the image file as the request body")
        name = urllib.parse.unquote(request.headers.get("x-filename", "upload"))
        record = await _call(explorer.add_upload, b"".join(chunks), name)
        return JSONResponse(
            {"id": record.id, "name": record.name, "url": pages.image_url(record.id)}
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(explorer.close)

    async def features_page(request: Request) -> Response:
        return HTMLResponse(await _call(pages.features_page, explorer))

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise InputError("the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        return body

    async def scan(request: Request) -> Response:
        body = await body_of(request)
        job = await _call(explorer.request_scan, str(body.get("layer", "")))
        await _until(job.finished.is_set, _seconds(body.get("wait"), 0.5))
        return JSONResponse(explorer.job_json(job), headers=_NO_STORE)

    async def channel(request: Request) -> Response:
        body = await body_of(request)
        job = await _call(explorer.request_channel, str(body.get("layer", "")), body.get("channel"))
        await _until(job.finished.is_set, _seconds(body.get("wait"), 2.0))
        return JSONResponse(explorer.job_json(job), headers=_NO_STORE)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        route("/", home),
        route("/favicon.ico", favicon),
        route("/run/report/index.html", run_index),
        route("/run/{path:path}", run_file),
        route("/image/{id}.html", image_page),
        route("/upload.html", upload_page),
        route("/features.html", features_page),
        route("/api/features/scan", scan, ("POST",)),
        route("/api/features/channel", channel, ("POST",)),
        route("/api/images/{id}", image_info),
        route("/api/images/{id}/input.png", input_png),
        route("/api/methods", methods),
        route("/api/layers", layers),
        route("/api/classes", classes),
        route("/api/explain", explain, ("POST",)),
        route("/api/jobs/{id}", job_status),
        route("/api/jobs/{id}/cancel", cancel, ("POST",)),
        route("/api/upload", upload, ("POST",)),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.explorer = explorer
    return app


def _seconds(value: object, default: float) -> float:
    """A wait in seconds from a request, in [0, 10]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return min(10.0, max(0.0, float(value)))
