"""Opening the files a user names: regular files only, text decoded as UTF-8 with clear errors.

Every input file convlens opens from a path the user gave (class lists, labelled-image CSVs,
images, model files, weights) is checked with :func:`require_file` first, or read with
:func:`read_user_text`:

* only regular files (or symbolic links to them) are accepted: a folder, a named pipe (FIFO),
  a device or a socket given where a file is expected is an error. A FIFO would otherwise block
  the reader forever, a device such as ``/dev/zero`` would never end;
* text is UTF-8. A UTF-8 byte-order mark is dropped, and a file with a UTF-16 byte-order mark
  (what Windows Notepad writes as "Unicode") is decoded as UTF-16. Anything else that is not
  UTF-8 (Latin-1, Windows-1252 ...) is an error naming the file, the line and the byte offset,
  asking to save the file as UTF-8: guessing a legacy encoding could silently turn a class name
  into another one.

Errors are raised as the :class:`~convlens.errors.ConvlensError` subclass the caller chooses
(``TargetError`` for class lists, ``ImageError`` for images ...).
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path

from convlens.errors import ConvlensError, InputError

__all__ = ["describe_file_kind", "read_user_text", "require_file"]

_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def describe_file_kind(mode: int) -> str:
    """What a non-regular file is, from its ``st_mode`` (``"a directory"``, ``"a named pipe
    (FIFO)"`` ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def require_file(
    path: str | os.PathLike[str], what: str, *, error: type[ConvlensError] = InputError
) -> Path:
    """Check that ``path`` names an existing regular file (symbolic links are followed).

    Args:
        path: the path the user gave.
        what: what the file is for, used in messages (``"class list"``).
        error: the exception class to raise.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConvlensError: (of class ``error``) the path is missing, unreadable, or not a regular
            file (a directory, FIFO, device or socket).
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError as exc:
        raise error(f"{what} '{p}' not found") from exc
    except OSError as exc:
        raise error(f"cannot read {what} '{p}': {_reason(exc)}") from exc
    except ValueError as exc:  # an embedded NUL byte
        raise error(f"{what} '{p}' is not a valid path ({exc})") from exc
    if not stat.S_ISREG(mode):
        raise error(f"{what} '{p}' is {describe_file_kind(mode)}; give a regular file")
    return p


def _read_regular(p: Path, what: str, error: type[ConvlensError]) -> bytes:
    """The bytes of ``p``, refusing anything but a regular file without blocking on it."""
    # O_NONBLOCK: opening a FIFO that was swapped in after require_file does not wait for a
    # writer; fstat on the open file then sees what it really is.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise error(f"cannot read {what} '{p}': {_reason(exc)}") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} '{p}' is {describe_file_kind(mode)}; give a regular file")
        try:
            return fh.read()
        except OSError as exc:
            raise error(f"cannot read {what} '{p}': {_reason(exc)}") from exc


def read_user_text(
    path: str | os.PathLike[str], what: str, *, error: type[ConvlensError] = InputError
) -> str:
    """Read a text file the user named, as UTF-8 (see the module notes for BOMs).

    Line endings are left as they are (``\\r\\n`` stays), so CSV readers see the file's own.

    Args:
        path: the file.
        what: what the file is for, used in messages (``"class list"``, ``"CSV file"``).
        error: the exception class to raise.

    Returns:
        The file's text.

    Raises:
        ConvlensError: (of class ``error``) the file is missing, unreadable, not a regular file,
            binary (holds NUL bytes) or not UTF-8 text; the message names the file and, for
            bad bytes, the line and byte offset of the first one.
    """
    p = require_file(path, what, error=error)
    data = _read_regular(p, what, error)
    encoding, skipped = "utf-8", 0
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, skipped = name, len(bom)
            data = data[skipped:]
            break
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise error(
            f"{what} '{p}' is not {encoding.upper()} text (byte 0x{bad} at offset "
            f"{exc.start + skipped}, "
            f"line {line}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        offset = text.index("\x00")
        raise error(
            f"{what} '{p}' looks like a binary file, not text (a NUL character at position "
            f"{offset}); give a UTF-8 text file"
        )
    return text
