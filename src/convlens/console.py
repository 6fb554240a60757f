"""Printing text the user controls (paths, class, layer and target names) to the terminal.

Everything convlens prints goes through a :class:`SafeConsole`: rich markup, emoji codes and
highlighting are off unless a call asks for them, so ``[/x]`` or ``:cat:`` in a file name is
printed as written instead of failing (``rich.errors.MarkupError``) or turning into an emoji.
Strings are also made printable on the way out (:func:`printable`): terminal control characters
(an ESC sequence in a file name) are shown escaped, and file names that are not valid UTF-8
(decoded by Python with ``surrogateescape``) print as ``\\xff`` instead of making a strict
stdout raise ``UnicodeEncodeError``.

Plot labels have their own markup (matplotlib's ``$...$`` math); :func:`plot_label` escapes it.

Where styling is wanted, build a :class:`rich.text.Text` (``Text.assemble(("error:", "red"),
" ", message)``) or escape the user's part with :func:`rich.markup.escape`; never format user
text into a markup string.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = [
    "SafeConsole",
    "description_column",
    "one_line",
    "plot_label",
    "printable",
    "progress_bar",
    "progress_callback",
]

_KEPT_CONTROLS = frozenset("\n\t")


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` with characters that must not reach a terminal shown escaped.

    Control characters (category ``Cc``: ESC, carriage return, bell ...) become ``\\x1b`` and the
    like, lone surrogates (the undecodable bytes of a file name read with ``surrogateescape``)
    become ``\\xff``. Newlines and tabs are kept unless ``keep_newlines`` is false.

    Args:
        text: any string.
        keep_newlines: keep ``\\n`` and ``\\t`` as they are.

    Returns:
        A string that prints as one piece of plain text on any UTF-8 or ASCII stream.
    """
    if text.isprintable():  # the common case, no copy
        return text
    kept = _KEPT_CONTROLS if keep_newlines else frozenset()
    return "".join(
        _escape_char(c) if c not in kept and unicodedata.category(c) in ("Cc", "Cs") else c
        for c in text
    )


def one_line(text: str) -> str:
    """``text`` on a single line: every control character, newlines included, escaped."""
    return printable(text, keep_newlines=False)


def plot_label(text: str) -> str:
    """``text`` for a matplotlib label, shown as written.

    Matplotlib reads text between two ``$`` as math (a class name ``"$5 and $6"`` would lose its
    dollars, ``"$\\frac{$"`` would fail the whole figure); escaped dollars are drawn as ``$``.
    Control characters are escaped as by :func:`one_line`.
    """
    return one_line(text).replace("$", r"\$")


class SafeConsole(Console):
    """A rich console for user text: markup, emoji codes and highlighting off by default.

    Pass ``markup=True`` to one ``print`` only for a literal string written in the code. Every
    string rendered (``print`` arguments, table cells and titles) goes through
    :func:`printable` first.

    Args:
        **kwargs: as for :class:`rich.console.Console`; ``markup``, ``emoji`` and ``highlight``
            default to ``False``.
    """

    def __init__(self, **kwargs: Any) -> None:
        for key in ("markup", "emoji", "highlight"):
            kwargs.setdefault(key, False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:  # type: ignore[override]
        """Convert a string to :class:`~rich.text.Text` after :func:`printable`."""
        return super().render_str(printable(text), **kwargs)


class _DescriptionColumn(ProgressColumn):
    """A task's description as plain text (:func:`printable`, never markup)."""

    def render(self, task: Task) -> Text:
        return Text(printable(task.description, keep_newlines=False))


def description_column() -> ProgressColumn:
    """A progress-bar column showing each task's description as plain text.

    rich's default ``TextColumn("{task.description}")`` reads the description as markup, so a
    layer or file name in it could fail the bar; use this column instead.
    """
    return _DescriptionColumn()


class _Progress(Progress):
    """A :class:`rich.progress.Progress` that takes its bars away when the work in its ``with``
    block fails, so the error line that follows is the only line left on the terminal."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.live.transient = True
        super().__exit__(exc_type, exc, tb)


def progress_bar(
    *, console: Console | None = None, transient: bool = False, fields: tuple[str, ...] = ()
) -> Progress:
    """The progress display of every long job: description, bar, ``done/total``, elapsed and
    remaining time, on stderr.

    Descriptions are plain text (:func:`description_column`). Used as a context manager, the
    bars disappear when the block raises (the command then prints its one ``error:`` line).

    Args:
        console: where to draw; default a :class:`SafeConsole` on stderr.
        transient: remove the bars when the block ends normally too.
        fields: names of task fields shown as text after the count (``add_task(..., score="")``).
    """
    return _Progress(
        description_column(),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or SafeConsole(stderr=True),
        transient=transient,
    )


def progress_callback(bar: Progress, description: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback drawing one task of ``bar`` (a :func:`progress_bar`), for
    the functions that report progress that way (:func:`convlens.features.scan_features`).

    The task is added at the first call, when the total is known; later calls move it on.

    Args:
        bar: the progress display to draw on (started by its owner).
        description: the task's description (plain text), e.g. ``"scanning"``.
    """
    task: list[TaskID] = []

    def update(done: int, total: int) -> None:
        if not task:
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    return update
