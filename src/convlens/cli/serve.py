"""``convlens serve``: the live explorer of an analysis run or an image folder."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from convlens.cli.options import ModelOptions, checked, option_group, out, say
from convlens.validate import positive_int

__all__ = ["register"]


def _port(value: int, name: str) -> int:
    if not 0 <= value <= 65535:
        from convlens.errors import InputError

        raise InputError(f"{name} must be a TCP port, 0..65535 (0: any free one), got {value}")
    return value


@option_group(ModelOptions)
def serve(
    folder: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(
            help="An analysis run folder (convlens analyze --out) or an image folder; none: "
            "only images dropped on the page."
        ),
    ] = None,
    *,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on; anything but the loopback address exposes the images "
            "and the model to the network (no authentication)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", callback=checked(_port))] = 8765,
    max_upload_mb: Annotated[
        int,
        typer.Option(help="Largest image upload, in MiB.", callback=checked(positive_int)),
    ] = 20,
    model_options: ModelOptions,
) -> None:
    """Explore a run or a folder in the browser: any method, class and layer, live."""
    from convlens.serve import require_extra
    from convlens.serve import serve as run_server

    require_extra()  # before loading the model: one line saying how to install
    net = model_options.load()
    run_server(
        net,
        folder,
        host=host,
        port=port,
        max_upload_bytes=max_upload_mb * 2**20,
        ready=lambda url: say(f"convlens explorer on {url} (Ctrl+C to stop)", console=out),
    )


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""
    app.command()(serve)
