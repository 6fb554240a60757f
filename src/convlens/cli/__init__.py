"""The ``convlens`` command line: thin wrappers over the public API.

The commands live in this package's modules, each adding its commands to :data:`app` with its
``register`` (:mod:`~convlens.cli.explain`: ``predict``, ``explain``, ``layers``, ``methods``,
``demo``; :mod:`~convlens.cli.features`; :mod:`~convlens.cli.analyze`;
:mod:`~convlens.cli.evaluate`; :mod:`~convlens.cli.synthesis`: ``classviz``, ``featviz``,
``dream``; :mod:`~convlens.cli.serve`); what they share (option types and groups, model
loading, output) is in :mod:`~convlens.cli.options`.

Every user error is reported as one line on stderr with exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

import typer

from convlens.accel.allocator import keep_freed_memory
from convlens.cli.options import fail, out, show_warning
from convlens.errors import ConvlensError

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer, on click
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

__all__ = ["app", "main"]

app = typer.Typer(
    name="convlens",
    help="See what a convolutional image classifier looks at, and why it gets images wrong.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("convlens")


def _register_commands() -> None:
    """Commands kept in their own modules, each adding itself to ``app``."""
    from convlens.cli import analyze, evaluate, explain, features, serve, synthesis

    explain.register(app)
    features.register(app)
    evaluate.register(app)
    analyze.register(app)
    synthesis.register(app)
    serve.register(app)


_register_commands()


def _usage_message(exc: Exception, args: Sequence[str]) -> str:
    """A click usage error as one line, with the ``--help`` to run."""
    text = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None)
    if not command:  # some parser errors carry no context: name the command given, if any
        first = next((a for a in args if not a.startswith("-")), None)
        command = f"convlens {first}" if first in _app_commands() else "convlens"
    return f"{text} (see '{command} --help')"


def _app_commands() -> set[str]:
    """The names of the ``convlens`` commands."""
    return {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: runs the app, turning user errors into one-line messages.

    A bad option or argument (not a number, unknown, missing) and every
    :class:`~convlens.errors.ConvlensError` print one ``error: ...`` line on stderr and exit with
    code 2; ``--help`` (and no arguments at all) print the help. ``--debug`` re-raises instead,
    showing the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    # The command owns its process: keep freed activation memory for reuse (CPU forward passes
    # ~2-3x faster, see convlens.accel.allocator).
    keep_freed_memory()
    shown, warnings.showwarning = warnings.showwarning, show_warning  # one "warning:" line
    try:
        code = _run(args, debug)
    finally:
        warnings.showwarning = shown
    sys.exit(code)


def _run(args: list[str], debug: bool) -> int:
    """Run the app; the exit code (user errors printed as one line)."""
    try:
        # standalone_mode=False: click's errors reach us instead of printing a usage box.
        code = app(args=args, prog_name="convlens", standalone_mode=False)
    except (ConvlensError, OSError) as exc:
        if debug:
            raise
        fail(str(exc))
        return 2
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `convlens` alone: the help, as before
            help_text = exc.format_message()
            if help_text.strip():  # typer with rich has printed it already
                out.print(help_text, soft_wrap=True)
            return 2
        if debug:
            raise
        fail(_usage_message(exc, args))
        return 2
    except ClickException as exc:
        if debug:
            raise
        fail(_usage_message(exc, args))
        return 2
    except typer.Abort:
        fail("aborted")
        return 1
    return code if isinstance(code, int) else 0
