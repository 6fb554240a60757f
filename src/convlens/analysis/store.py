"""The incremental result store of an analysis run: one SQLite file, written batch by batch.

The file ``RUN_DIR/predictions.sqlite`` is opened in WAL mode and each batch is written in one
transaction, so a killed run loses at most the batch in flight and the file stays readable.
SQLite errors (a full disk, a disk I/O error, a locked or corrupt file) are raised as
:class:`~convlens.errors.ConvlensError` naming the file, after the batch's transaction is rolled
back: the store keeps every batch committed before, and a rerun resumes from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from convlens.console import printable
from convlens.errors import ConvlensError, OutputError, RunFolderError

__all__ = ["Prediction", "PredictionStore", "image_id"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    label INTEGER,
    top5 TEXT NOT NULL,
    probs5 TEXT NOT NULL,
    pred INTEGER NOT NULL,
    confidence REAL NOT NULL,
    loss REAL,
    correct INTEGER
);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS complete_files (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
);
"""


def store_error(path: Path, exc: sqlite3.Error) -> ConvlensError:
    """The error to raise for an SQLite error on the store ``path``: what happened and what to
    do, on one line."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    resume = "run again to resume (finished batches are kept)"
    if "full" in low:
        return OutputError(f"cannot write {path}: {text}; free some space and {resume}")
    if "disk i/o" in low:
        return OutputError(f"cannot write {path}: {text}; check the disk and {resume}")
    if "locked" in low or "busy" in low:
        return RunFolderError(
            f"{path} is locked by another process ({text}); wait for it to finish or "
            "choose another --out"
        )
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        return OutputError(
            f"cannot write {path}: {text}; check the folder's permissions or choose another --out"
        )
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return RunFolderError(
            f"{path} is not a readable convlens store ({text}); move it away to start over, "
            "or choose another --out"
        )
    return OutputError(f"cannot use {path}: {text}; {resume}, or choose another --out")


def image_id(path: str | Path) -> str:
    """A short stable identifier of an image path (used for file names in the run folder)."""
    # surrogateescape: a file name that is not UTF-8 hashes its raw bytes (other ids unchanged)
    return hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _to_db(path: str) -> str | bytes:
    """A path as SQLite can hold it: text, or its raw bytes when the name is not UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes kept by surrogateescape
        return os.fsencode(path)
    return path


def _from_db(value: str | bytes) -> str:
    """The inverse of :func:`_to_db`."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Prediction:
    """One stored prediction.

    Attributes:
        id: :func:`image_id` of the path.
        path: the image file, as given by the data set.
        label: true class index, or ``None`` for unlabelled images.
        top5: the five (or fewer) most probable classes, most probable first.
        probs5: their probabilities.
        loss: cross-entropy of the label (``None`` without a label).
        correct: whether the top-1 class is the label (``None`` without a label).
    """

    id: str
    path: str
    label: int | None
    top5: tuple[int, ...]
    probs5: tuple[float, ...]
    loss: float | None
    correct: bool | None

    @property
    def pred(self) -> int:
        """The top-1 class."""
        return self.top5[0]

    @property
    def confidence(self) -> float:
        """Probability of the top-1 class."""
        return self.probs5[0]


class PredictionStore:
    """SQLite store of predictions and failures; use as a context manager.

    Every method raises a :class:`~convlens.errors.ConvlensError` naming the file on an SQLite
    error (see :func:`store_error`); a failed batch is rolled back.

    Args:
        path: the database file (created with its folder when missing).

    Raises:
        OutputError: the file or its folder cannot be created or written.
        RunFolderError: the file is not an SQLite database, or is locked by another process.
    """

    def __init__(self, path: str | Path) -> None:
        from convlens.atomic import write_error

        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path.parent, exc) from exc
        with self._errors():
            self._conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            with self._errors():
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.executescript(_SCHEMA)
        except BaseException:
            self._conn.close()
            raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite errors as :func:`store_error`."""
        try:
            yield
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        self._conn.close()

    def set_meta(self, **values: object) -> None:
        """Record run metadata (stored as JSON)."""
        with self._errors(), self._transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    def meta(self) -> dict[str, object]:
        """The run metadata."""
        with self._errors():
            rows = list(self._conn.execute("SELECT key, value FROM meta"))
        return {k: json.loads(v) for k, v in rows}

    def finished_paths(self, *, retry: Iterable[str] = ()) -> set[str]:
        """Paths already predicted or already recorded as failures.

        Args:
            retry: failure reasons that do not count as finished (tried again on a rerun, e.g.
                non-finite model outputs, which new weights may fix).
        """
        retry = list(retry)
        with self._errors():
            done = {_from_db(r[0]) for r in self._conn.execute("SELECT path FROM predictions")}
            failed = self._conn.execute(
                "SELECT path FROM failures WHERE reason NOT IN "
                f"({', '.join('?' * len(retry)) or 'NULL'})",
                retry,
            )
            return done | {_from_db(r[0]) for r in failed}

    def add_batch(
        self, predictions: Iterable[Prediction], failures: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Write one batch of predictions and failures in a single transaction (rolled back
        whole when it fails)."""
        predictions = list(predictions)
        with self._errors(), self._transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO predictions "
                "(id, path, label, top5, probs5, pred, confidence, loss, correct) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        p.id,
                        _to_db(p.path),
                        p.label,
                        json.dumps(list(p.top5)),
                        json.dumps(list(p.probs5)),
                        p.pred,
                        p.confidence,
                        p.loss,
                        None if p.correct is None else int(p.correct),
                    )
                    for p in predictions
                ],
            )
            # a failure tried again and now predicted is a failure no more
            self._conn.executemany(
                "DELETE FROM failures WHERE path = ?", [(_to_db(p.path),) for p in predictions]
            )
            self._conn.executemany(
                "INSERT OR REPLACE INTO failures (path, reason) VALUES (?, ?)",
                [(_to_db(path), printable(reason)) for path, reason in failures],
            )

    def predictions(self) -> list[Prediction]:
        """All stored predictions, sorted by path."""
        with self._errors():
            rows = list(
                self._conn.execute(
                    "SELECT id, path, label, top5, probs5, loss, correct FROM predictions "
                    "ORDER BY path"
                )
            )
        return [
            Prediction(
                id=r[0],
                path=_from_db(r[1]),
                label=r[2],
                top5=tuple(json.loads(r[3])),
                probs5=tuple(json.loads(r[4])),
                loss=r[5],
                correct=None if r[6] is None else bool(r[6]),
            )
            for r in rows
        ]

    def failures(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image that could not be read or predicted, by path."""
        with self._errors():
            rows = self._conn.execute("SELECT path, reason FROM failures ORDER BY path")
            return [(_from_db(path), reason) for path, reason in rows]

    def complete_files(self) -> dict[str, tuple[int, int]]:
        """Files of the run folder found complete before (:meth:`record_complete`): name
        (relative to the folder) -> ``(size, mtime_ns)`` when they were. A file whose size and
        modification time are still these is the same complete file and need not be opened."""
        with self._errors():
            rows = self._conn.execute("SELECT name, size, mtime_ns FROM complete_files")
            return {name: (size, mtime) for name, size, mtime in rows}

    def record_complete(self, files: dict[str, tuple[int, int]]) -> None:
        """Record files found complete: name -> ``(size, mtime_ns)`` (one transaction)."""
        if not files:
            return
        with self._errors(), self._transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO complete_files (name, size, mtime_ns) VALUES (?, ?, ?)",
                [(name, size, mtime) for name, (size, mtime) in files.items()],
            )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    """``BEGIN`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except BaseException:  # e.g. a full disk at commit: the batch is dropped whole
                self._rollback()
                raise
        else:
            self._rollback()
        return False

    def _rollback(self) -> None:
        if self._conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
