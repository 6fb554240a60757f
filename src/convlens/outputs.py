"""Output folders: one writer at a time, and file names that never collide.

:func:`lock_folder` gives the process that writes an output folder an exclusive lock on
``FOLDER/.lock`` (``fcntl.flock``; ``msvcrt.locking`` on Windows). The lock is not waited for: a
second writer gets a :class:`~convlens.errors.RunFolderError` naming the process that holds it.
The operating system releases it when the holder exits, however it ends, so a killed run can be
resumed at once; the ``.lock`` file is removed when the lock is let go (one left by a killed
process is harmless and reused).

:func:`output_stems` names the outputs of input files: an input's stem when no other input has
the same stem (compared case-insensitively, as on macOS and Windows file systems), else the stem
and ``-`` and the first hex digits of the SHA-1 of the input's absolute path
(``photo-3f2a``): stable across runs, different for each input. :func:`claim_output_stems` does
the same in an output folder that earlier runs wrote: it records which input each name was used
for (``FOLDER/.convlens-outputs.json``) and never gives a name that holds the outputs of another
input to a new one (that input gets its hashed name instead), so nothing an earlier run wrote is
overwritten, except by the outputs of the same input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from convlens.atomic import remove_stale_temporaries
from convlens.console import printable
from convlens.errors import OutputError, RunFolderError

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "check_out_dir",
    "claim_output_stems",
    "lock_folder",
    "output_stems",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
MANIFEST_NAME = ".convlens-outputs.json"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(lock: Path) -> str:
    """``analyze (pid 123)``: what the lock file says of its holder."""
    try:
        pid, _, command = lock.read_text(encoding="utf-8", errors="replace").partition(" ")
    except OSError:
        pid, command = "", ""
    command = command.strip() if command.strip().isidentifier() else "command"
    return f"{command} (pid {pid})" if pid.isdigit() else f"{command} (pid unknown)"


def check_out_dir(folder: str | Path, option: str = "--out") -> Path:
    """``folder`` as a path, checked to be usable as an output folder (missing or a folder).

    Raises:
        OutputError: ``folder`` exists and is not a folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"{option} {folder} is a file, not a folder; choose a folder (missing ones are created)"
        )
    return folder


@contextlib.contextmanager
def lock_folder(folder: str | Path, command: str, *, option: str = "--out") -> Iterator[Path]:
    """Hold the write lock of an output folder for the block (created when missing).

    While it is held, temporary files left in the folder by killed writes are removed (see
    :func:`~convlens.atomic.remove_stale_temporaries`).

    Args:
        folder: the output folder.
        command: the convlens command writing it, e.g. ``"analyze"`` (recorded in the lock
            file with the process id, for the message another writer gets).
        option: the option that chooses the folder (for the message).

    Yields:
        The folder (removed again at the end if this call created it and it is still empty).

    Raises:
        RunFolderError: another process holds the lock.
        OutputError: the folder or its lock file cannot be created.
    """
    from convlens.atomic import write_error

    folder = check_out_dir(folder, option)
    lock = folder / LOCK_NAME
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock)
    except OSError as exc:
        raise write_error(lock, exc) from exc
    if fd is None:
        raise RunFolderError(
            f"{folder} is being written by another convlens {_holder(lock)}; "
            f"wait for it to finish or choose another {option}"
        )
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message above
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {command}".encode())
        remove_stale_temporaries(folder)
        yield folder
    finally:
        with contextlib.suppress(OSError):  # removed while still held (see _acquire)
            lock.unlink()
        os.close(fd)  # releases the lock
        if created:  # nothing was written (e.g. bad input): leave no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _acquire(lock: Path) -> int | None:
    """A descriptor of ``lock`` holding its lock, or ``None`` when another process holds it.

    The holder removes the file before it lets go of the lock, so a lock taken on a file that
    is no longer at ``lock`` (or another file is there now) is let go and taken again.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _digest(path: Path) -> str:
    text = os.path.abspath(path).encode("utf-8", "surrogateescape")
    return hashlib.sha1(text).hexdigest()


def output_stems(paths: Sequence[str | Path]) -> list[str]:
    """The base name of each input's output files, unique among ``paths``.

    An input keeps its stem (``photo.jpg`` -> ``photo``) unless another input has the same stem
    (case-insensitively); then each of those gets ``STEM-HASH`` with HASH the first 4 (more if
    needed to tell them apart) hex digits of the SHA-1 of its absolute path, e.g.
    ``a/photo.jpg`` -> ``photo-3f2a`` and ``b/photo.jpg`` -> ``photo-91c0``. The same file
    given twice gets the same name.

    Args:
        paths: the input files, in order.

    Returns:
        One stem per input, in the same order.
    """
    files = [Path(p) for p in paths]
    counts = Counter(f.stem.casefold() for f in {Path(os.path.abspath(f)) for f in files})
    digests = {f: _digest(f) for f in files if counts[f.stem.casefold()] > 1}
    taken = {f.stem.casefold() for f in files if counts[f.stem.casefold()] == 1}
    for n in range(4, 41):
        named = {f: f"{f.stem}-{d[:n]}" for f, d in digests.items()}
        distinct = {Path(os.path.abspath(f)): s.casefold() for f, s in named.items()}
        values = list(distinct.values())
        if len(set(values)) == len(values) and not taken & set(values):
            break
    return [named[f] if f in digests else f.stem for f in files]


def _read_manifest(path: Path) -> dict[str, str]:
    """``{output name: absolute input path}`` of an output folder (empty when unreadable)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", printable(str(path)), printable(str(exc)))
        return {}
    if not isinstance(stored, dict):
        return {}
    return {str(k): str(v) for k, v in stored.items()}


def claim_output_stems(
    folder: str | Path, paths: Sequence[str | Path], marker: Callable[[str], str]
) -> list[str]:
    """:func:`output_stems` for outputs written to ``folder``, never reusing another input's.

    An input the folder's manifest (``.convlens-outputs.json``) already records keeps the name
    it had. Otherwise a name is free for an input when the manifest records nothing for it and
    the file ``marker(name)`` (the one output every input gets, e.g. ``NAME_panel.png``) does
    not exist. An input whose name is not free gets ``STEM-HASH`` (as in :func:`output_stems`,
    longer if needed). Names are compared case-insensitively. The names are recorded in the
    manifest before returning. Call it while holding the folder's lock.

    Args:
        folder: the output folder.
        paths: the input files, in order.
        marker: the file name, in ``folder``, that shows a name is in use.

    Returns:
        One stem per input, in the same order.

    Raises:
        OutputError: the manifest cannot be written.
    """
    from convlens.atomic import atomic_write_text

    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    owner = {name.casefold(): source for name, source in manifest.items()}
    known = {source: name for name, source in manifest.items()}
    assigned: dict[str, str] = {}  # casefolded name -> source, this call

    def free(name: str, source: str) -> bool:
        key = name.casefold()
        if key in assigned:
            return assigned[key] == source
        if key in owner:
            return owner[key] == source
        return not (folder / marker(name)).exists()

    stems = []
    for path, preferred in zip(paths, output_stems(paths), strict=True):
        source = os.path.abspath(path)
        name = known.get(source, preferred)
        digest, n = _digest(Path(path)), 4
        while not free(name, source):
            name = f"{Path(path).stem}-{digest[:n]}"
            n += 1
            if n > len(digest):
                digest += hashlib.sha1(digest.encode()).hexdigest()
        assigned[name.casefold()] = source
        stems.append(name)
        if manifest.get(name) != source:
            manifest[name] = source
            owner[name.casefold()] = source
    if manifest != _read_manifest(manifest_path):
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return stems
