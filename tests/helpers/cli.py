"""Running the command line in-process for the tests (see :mod:`tests.helpers.corpus` for the
harness that also captures output and runs commands in a child process)."""

from __future__ import annotations

import pytest

from convlens.cli import main

__all__ = ["exit_code"]


def exit_code(args: list[str]) -> int:
    """Run ``convlens ARGS`` through :func:`convlens.cli.main` (which always exits) and return
    its exit code; the test reads the output with ``capsys``."""
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)
