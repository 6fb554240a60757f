"""The live explorer (``convlens serve``): an analysis run or an image folder in the browser, every
map computed on demand.

Needs the ``serve`` extra (``pip install 'convlens[serve]'``: Starlette and uvicorn), imported
only here and only when the explorer starts. :func:`serve` runs the server;
:class:`~convlens.serve.explorer.Explorer` holds what it knows and computes;
:func:`~convlens.serve.app.create_app` is the web application over it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.errors import ConvlensError

if TYPE_CHECKING:
    from convlens.models.base import ConvlensModel
    from convlens.serve.explorer import Explorer

__all__ = [
    "INSTALL_HINT",
    "LOOPBACK",
    "MissingExtraError",
    "ServeError",
    "background",
    "require_extra",
    "serve",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "convlens serve needs the serve extra: pip install 'convlens[serve]'"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class MissingExtraError(ConvlensError):
    """Starlette or uvicorn is not installed."""


class ServeError(ConvlensError):
    """The server cannot listen on the address and port asked for."""


def require_extra() -> None:
    """Raise :class:`MissingExtraError` (one line: how to install) without Starlette or uvicorn."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{INSTALL_HINT} ({' and '.join(missing)} not installed)")


def exposure_warning(host: str) -> str | None:
    """The warning to show when the server listens beyond this machine, else ``None``."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (
        f"listening on {host}: anyone who can reach this machine on the network can see the "
        "images and run the model (there is no authentication); use --host 127.0.0.1 to "
        "keep it local"
    )


def serve(
    model: ConvlensModel,
    folder: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    workers: int = 2,
    max_upload_bytes: int | None = None,
    ready: Any = None,
) -> None:
    """Run the explorer until interrupted.

    Args:
        model: the model that explains.
        folder: an analysis run folder (``convlens analyze --out``), an image folder, or
            ``None`` (only images dropped on the page).
        host: the address to listen on; the loopback address by default (a warning is issued
            for any other: the server has no authentication).
        port: the TCP port.
        workers: threads computing maps (computations on the model still run one at a time).
        max_upload_bytes: largest image upload accepted (default 20 MiB).
        ready: called with the URL once the socket is bound, before serving (the CLI prints it).

    Raises:
        MissingExtraError: Starlette or uvicorn is missing.
        ServeError: the port is taken (or the address is not this machine's).
        ConvlensError: the folder cannot be read.
    """
    require_extra()
    import uvicorn

    from convlens.serve.app import create_app
    from convlens.serve.explorer import MAX_UPLOAD_BYTES, Explorer

    exposed = exposure_warning(host)
    if exposed is not None:
        warnings.warn(exposed, UserWarning, stacklevel=2)
    explorer = Explorer(
        model,
        None if folder is None else Path(folder),
        workers=workers,
        max_upload_bytes=MAX_UPLOAD_BYTES if max_upload_bytes is None else max_upload_bytes,
    )
    app = create_app(explorer, host)
    try:
        sock = _bind(host, port)
    except ServeError:
        explorer.close()
        raise
    threading.Thread(target=explorer.warm_up, name="convlens-warm-up", daemon=True).start()
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    if ready is not None:
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{sock.getsockname()[1]}/")
    with sock:
        uvicorn.Server(config).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port).

    Raises:
        ServeError: the port is taken or the address is not this machine's.
    """
    try:
        return socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host} port {port}: {exc.strerror or exc}; choose another --port"
        ) from exc


@contextlib.contextmanager
def background(explorer: Explorer, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``explorer`` from a thread of this process for the ``with`` block (notebooks,
    tests, benchmarks); yields the URL (``http://127.0.0.1:PORT/``). The explorer is closed
    when the block ends.

    Raises:
        MissingExtraError: Starlette or uvicorn is missing.
        ServeError: the port is taken.
    """
    require_extra()
    import uvicorn

    from convlens.serve.app import create_app

    sock = _bind(host, port)
    config = uvicorn.Config(create_app(explorer, host), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="convlens-serve", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ServeError("the explorer did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
