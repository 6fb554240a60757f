"""Atomic file writes: every artifact convlens writes appears whole or not at all.

Each writer goes through :func:`atomic_path`: the data is written to a temporary file in the
destination's folder (``.NAME.tmp-PID-RAND.SUFFIX``, same suffix so that PIL and matplotlib pick
the format from it), flushed to disk, and renamed over the destination with :func:`os.replace`,
which is atomic on POSIX and Windows. A process killed mid-write leaves at most such a temporary
file (removed by :func:`remove_stale_temporaries` when the folder is next written under its
lock), never a truncated or empty destination; a failed write (full disk, permissions) raises
:class:`~convlens.errors.OutputError` naming the destination and leaves any previous version of
it untouched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.console import printable
from convlens.errors import OutputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_complete",
    "remove_stale_temporaries",
    "save_image",
    "save_matplotlib",
    "write_error",
]

log = logging.getLogger(__name__)

_TEMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\.[^.]*)?$")
_HINTS = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space (disk quota exceeded) and run again",
    errno.EACCES: "check the folder's permissions or choose another output folder",
    errno.EPERM: "check the folder's permissions or choose another output folder",
    errno.EROFS: "the file system is read-only; choose another output folder",
}


def write_error(path: str | Path, exc: OSError) -> OutputError:
    """The :class:`~convlens.errors.OutputError` for a failed write of ``path``.

    Args:
        path: the destination that could not be written.
        exc: the error the write raised.

    Returns:
        An error whose message names ``path``, the reason and what to do.
    """
    if isinstance(exc, OutputError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno or 0, "check the disk and the folder, then run again")
    error = OutputError(f"cannot write {path}: {reason}; {hint}")
    error.errno = exc.errno
    return error


def _temporary(path: Path) -> Path:
    # The stem is shortened (in bytes, as file systems count: 120 + 32 for the rest) so that the
    # temporary name stays within the usual 255-byte limit of a file name.
    stem = os.fsencode(path.stem)[:120].decode("utf-8", "ignore") or "f"
    return path.with_name(f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _fsync(fd: int) -> None:
    """Flush a file (or folder) descriptor to disk (a separate function, so that tests can
    make it fail like a full disk does)."""
    os.fsync(fd)


def _sync_file(path: Path) -> None:
    # POSIX flushes through any descriptor; Windows needs one open for writing
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX only; best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            _fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, durable: bool) -> None:
    """Rename the finished ``tmp`` over ``path`` (flushed to disk first when ``durable``)."""
    if durable:
        _sync_file(tmp)
    os.replace(tmp, path)
    if durable:
        _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary path to write ``path`` through; renamed over ``path`` when the block succeeds.

    The parent folder is created. The temporary file is in the same folder, starts with ``.``
    and ends with ``path``'s suffix; when the block ends without an error it is flushed to disk
    and atomically renamed to ``path``; when it raises, the temporary file is removed and
    ``path`` is left as it was.

    The rename alone guarantees that a killed process leaves the old file or the new one, never
    a part. ``durable`` also survives a power cut (an ``fsync`` of the file and its folder,
    about 10 ms a file on a typical disk); artifacts that a rerun redraws (thumbnails, overlays,
    panels) skip it.

    Args:
        path: the destination.
        durable: flush the file and the rename to disk before returning.

    Yields:
        The temporary path the caller writes to (once, as a whole file).

    Raises:
        OutputError: the folder cannot be created, or the file cannot be written, flushed or
            renamed (full disk, permissions); the message names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp = _temporary(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise OutputError(f"cannot write {path}: the writer produced no file")
        _commit(tmp, path, durable)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the file cannot be written; the message names ``path``.
    """
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default; see :func:`atomic_path`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the file cannot be written; the message names ``path``.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def save_image(
    image: Image.Image, path: str | Path, *, durable: bool = False, **params: Any
) -> Path:
    """``image.save(path, **params)``, atomically; the format follows ``path``'s suffix.

    Not ``durable`` by default (see :func:`atomic_path`): images are redrawn by a rerun.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the file cannot be written; the message names ``path``.
    """
    with atomic_path(path, durable=durable) as tmp:
        image.save(tmp, **params)
    return Path(path)


def save_matplotlib(fig: Figure, path: str | Path, *, durable: bool = False, **params: Any) -> Path:
    """``fig.savefig(path, **params)``, atomically (not ``durable`` by default, as
    :func:`save_image`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the file cannot be written; the message names ``path``.
    """
    with atomic_path(path, durable=durable) as tmp:
        fig.savefig(tmp, **params)
    return Path(path)


# A complete file of these formats ends with these bytes (a truncated one does not).
_TRAILERS = {
    ".png": b"IEND\xaeB`\x82",
    ".jpg": b"\xff\xd9",
    ".jpeg": b"\xff\xd9",
}


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a non-empty regular file that was written to its end.

    Files written through :func:`atomic_path` always are; this check is for files left by older
    versions or other tools: an empty file is incomplete, and a PNG or JPEG must end with its
    format's end marker (a cheap check: only the last bytes are read).
    """
    path = Path(path)
    try:
        size = path.stat().st_size if path.is_file() else 0
        if size == 0:
            return False
        trailer = _TRAILERS.get(path.suffix.lower())
        if trailer is None:
            return True
        with open(path, "rb") as fh:
            fh.seek(max(0, size - len(trailer)))
            return fh.read() == trailer
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (then its temporary files may be writes in progress, in
    a subfolder another convlens process holds, and are left alone)."""
    if pid == os.getpid() or os.name != "posix":  # (signal 0 means CTRL_C on Windows)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or unknowable: keep the file
    return True


def remove_stale_temporaries(folder: str | Path, *, recursive: bool = True) -> int:
    """Remove the temporary files of writes that never finished (their process was killed).

    Only call this on a folder the caller holds the lock of
    (:func:`~convlens.outputs.lock_folder`). A temporary file is removed only when the process
    that wrote it (its name holds the pid) no longer exists: a subfolder may be another run's
    folder, locked and written by a live process.

    Args:
        folder: the output folder.
        recursive: also look in its subfolders.

    Returns:
        The number of files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    candidates = folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")
    for f in candidates:
        m = _TEMP.match(f.name)
        if m is None or _alive(int(m.group(1))) or not f.is_file():
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            removed += 1
            log.info("removed %s, left by a write that did not finish", printable(str(f)))
    return removed
