"""A corpus of bad and unusual inputs, written at test time, and a harness that runs the CLI on it.

:func:`build_corpus` writes into a folder: a tiny user model (``net.py`` with factories ``build``,
``build_nan`` and ``build_nan_bright``), class lists and CSV files in several encodings and
shapes, image files in every colour mode and container quirk Pillow reads, broken image files
(corrupt, truncated, empty, tiny, a header declaring 30000 x 30000 pixels), file-system oddities
(a directory named ``x.jpg``, symlink loops, dangling symlinks, FIFOs), file names with rich markup
(``[/x]``) and with a byte that is not valid UTF-8, and labelled folders that mix one bad file
with a good one. Nothing is committed: every file is generated from a seed, and the largest
(a 4400 x 2400 JPEG, a 4400 x 400 PNG) are solid colours that compress to a few kilobytes.

:func:`run_cli` runs ``convlens.cli.main`` in-process and returns what a user would see (exit
code, stdout, stderr, or the exception that would have printed a traceback);
:func:`start_cli_process` runs it in a child process for the inputs that can block a reader
(FIFOs) or exhaust memory. :func:`assert_clean_error` and :func:`assert_success` state what a
clean run looks like.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.models import tiny_net_source

__all__ = [
    "BAD_IMAGES",
    "CLASSES",
    "GOOD_IMAGES",
    "HUGE_JPEG",
    "HUGE_PNG",
    "NET_SOURCE",
    "UNDECODABLE",
    "CliResult",
    "Corpus",
    "assert_clean_error",
    "assert_success",
    "build_corpus",
    "finish_cli_process",
    "run_cli",
    "start_cli_process",
]

CLASSES = ("cat", "dog", "bird")
"""The class list of the tiny model (three outputs)."""

NET_SOURCE = tiny_net_source() + textwrap.dedent(
    """

    class _Nan(nn.Module):
        def forward(self, x):
            return x * float("nan")


    def build_nan():
        # Every output NaN.
        return nn.Sequential(*build(), _Nan())


    class _NanWhenBright(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = build()

        def forward(self, x):
            y = self.body(x)
            bright = x.mean(dim=(1, 2, 3)) > 1.5
            return torch.where(bright[:, None], torch.full_like(y, float("nan")), y)


    def build_nan_bright():
        # NaN outputs for bright images (a white photo), finite ones for the others.
        return _NanWhenBright()
    """
)
"""A tiny GAP classifier (3 classes) and two variants whose outputs are NaN."""

HUGE_JPEG = (4400, 2400)
HUGE_PNG = (4400, 400)
"""Sizes of the two huge images (over the 4096 px that ``load_image`` keeps by default)."""

UNDECODABLE = os.fsdecode(b"bad\xff.png")
"""A file name with a byte that is not UTF-8 (``'bad\\udcff.png'`` as Python sees it)."""

GOOD_IMAGES = (
    "rgb.png",
    "gray.png",
    "gray_jpeg.jpg",
    "bilevel.png",
    "palette.png",
    "palette_transparent.png",
    "rgba.png",
    "la.png",
    "gray16.png",
    "rgb16.png",
    "cmyk.jpg",
    "float_nan.tif",
    "multipage.tif",
    "animated.gif",
    "exif_rotated.jpg",
    "huge_jpeg.jpg",
    "huge_png.png",
    "png_named.jpg",
    "symlink_to_rgb.png",
)
"""Files in ``Corpus.images`` that are readable images (they must work everywhere)."""

BAD_IMAGES = (
    "corrupt.jpg",
    "not_an_image.png",
    "truncated.jpg",
    "truncated.png",
    "empty.png",
    "tiny.png",
    "thin.png",
    "declared_huge.png",
    "directory.jpg",
    "loop.jpg",
    "dangling.jpg",
)
"""Files in ``Corpus.bad`` that cannot be read as images."""


@dataclass
class Corpus:
    """Paths of the generated inputs (see :func:`build_corpus`)."""

    root: Path
    net: Path
    labels: Path
    images: dict[str, Path] = field(default_factory=dict)
    bad: dict[str, Path] = field(default_factory=dict)
    named: dict[str, Path] = field(default_factory=dict)
    sets: dict[str, Path] = field(default_factory=dict)
    classes: dict[str, Path] = field(default_factory=dict)
    csv: dict[str, Path] = field(default_factory=dict)
    weights: dict[str, Path] = field(default_factory=dict)
    fifos: dict[str, Path] = field(default_factory=dict)
    frames: dict[str, np.ndarray] = field(default_factory=dict)

    def __repr__(self) -> str:  # short, for failure reports
        return f"Corpus({self.root})"

    def model(self, factory: str = "build") -> str:
        """The ``--model`` value of one of the factories in ``net.py``."""
        return f"{self.net}:{factory}"


# ------------------------------------------------------------------------------- file writers


def _noise(rng: np.random.Generator, h: int = 48, w: int = 64, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _png_bytes(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG file from raw scanlines (each already prefixed with its filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def write_rgb16_png(path: Path, rng: np.random.Generator) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one, so the bytes are assembled here)."""
    a = rng.integers(0, 65536, (48, 64, 3), dtype=np.uint16).astype(">u2")
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(a.shape[0]))
    path.write_bytes(_png_bytes(64, 48, 16, 2, rows))


def write_declared_huge_png(path: Path) -> None:
    """A valid PNG header declaring 30000 x 30000 pixels (900 MP) with almost no data."""
    path.write_bytes(_png_bytes(30000, 30000, 8, 0, b"\x00" * 16))


def _write_good_images(folder: Path, rng: np.random.Generator, corpus: Corpus) -> None:
    folder.mkdir(parents=True)
    rgb = Image.fromarray(_noise(rng))
    paths = {name: folder / name for name in GOOD_IMAGES}
    rgb.save(paths["rgb.png"])
    rgb.convert("L").save(paths["gray.png"])
    rgb.convert("L").save(paths["gray_jpeg.jpg"], quality=90)
    rgb.convert("1").save(paths["bilevel.png"])
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette.png"])
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
        paths["palette_transparent.png"], transparency=0
    )
    Image.fromarray(_noise(rng, c=4), "RGBA").save(paths["rgba.png"])
    Image.fromarray(_noise(rng, c=2), "LA").save(paths["la.png"])
    Image.fromarray(rng.integers(0, 65536, (48, 64), dtype=np.uint16)).save(paths["gray16.png"])
    write_rgb16_png(paths["rgb16.png"], rng)
    Image.fromarray(_noise(rng, c=4), "CMYK").save(paths["cmyk.jpg"], quality=90)
    f = rng.random((48, 64)).astype(np.float32)
    f[::7, ::5] = np.nan
    Image.fromarray(f, "F").save(paths["float_nan.tif"])
    Image.fromarray(_noise(rng)).save(
        paths["multipage.tif"], save_all=True, append_images=[Image.fromarray(_noise(rng))]
    )
    # Animated GIF: two frames of solid colours (exact in a palette), the first one two-coloured.
    first = np.zeros((48, 64, 3), dtype=np.uint8)
    first[:, :32] = (255, 0, 0)
    first[:, 32:] = (0, 0, 255)
    second = np.zeros((48, 64, 3), dtype=np.uint8)
    second[:] = (0, 255, 0)
    corpus.frames["first"], corpus.frames["second"] = first, second
    Image.fromarray(first).save(
        paths["animated.gif"],
        save_all=True,
        append_images=[Image.fromarray(second)],
        duration=100,
        loop=0,
    )
    # EXIF orientation 6 (rotate 90° clockwise to display): stored 64x48, shown 48x64.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _noise(rng)
    stored[:8, :8] = 255  # a white marker in the stored top-left corner
    Image.fromarray(stored).save(paths["exif_rotated.jpg"], exif=exif, quality=95)
    # Huge but cheap: solid colours compress to a few kilobytes; longer than 4096 px, so decoded
    # reduced (a JPEG by the decoder itself).
    Image.new("L", HUGE_JPEG, 128).save(paths["huge_jpeg.jpg"], quality=50)
    Image.new("L", HUGE_PNG, 90).save(paths["huge_png.png"])
    rgb.save(paths["png_named.jpg"], format="PNG")
    paths["symlink_to_rgb.png"].symlink_to("rgb.png")
    corpus.images.update(paths)


def _write_bad_images(folder: Path, rng: np.random.Generator, corpus: Corpus) -> None:
    folder.mkdir(parents=True)
    paths = {name: folder / name for name in BAD_IMAGES}
    paths["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(4000))
    paths["not_an_image.png"].write_text("this is not an image\n")
    jpeg, png = folder / "full.jpg", folder / "full.png"
    Image.fromarray(_noise(rng)).save(jpeg, quality=90)
    Image.fromarray(_noise(rng)).save(png)
    for src, dst in ((jpeg, "truncated.jpg"), (png, "truncated.png")):
        data = src.read_bytes()
        paths[dst].write_bytes(data[: len(data) // 2])
        src.unlink()
    paths["empty.png"].write_bytes(b"")
    Image.fromarray(_noise(rng, 20, 20)).save(paths["tiny.png"])
    Image.fromarray(_noise(rng, 1000, 4)).save(paths["thin.png"])
    write_declared_huge_png(paths["declared_huge.png"])
    paths["directory.jpg"].mkdir()
    paths["loop.jpg"].symlink_to("loop.jpg")
    paths["dangling.jpg"].symlink_to("no-such-file.jpg")
    corpus.bad.update(paths)


def _labelled_set(folder: Path, rng: np.random.Generator, extra: dict[str, Path] | None = None):
    """``folder/cat/good.png``, ``folder/dog/good.png`` and each of ``extra`` under ``cat/``
    (copied, or re-created for links, folders and FIFOs)."""
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        Image.fromarray(_noise(rng)).save(folder / cls / "good.png")
    for name, src in (extra or {}).items():
        dst = folder / "cat" / name
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_dir():
            dst.mkdir()
        else:
            dst.write_bytes(src.read_bytes())
    return folder


def build_corpus(root: Path, seed: int = 0) -> Corpus:
    """Write the corpus into ``root`` (an empty folder) and return its paths.

    Everything except FIFOs is safe to read in-process; the FIFOs (``Corpus.fifos`` and the
    set ``sets["with_fifo"]``) block a reader until a writer appears, so only run them through
    :func:`start_cli_process`.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    net = root / "net.py"
    net.write_text(NET_SOURCE)
    labels = root / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    c = Corpus(root=root, net=net, labels=labels)
    _write_good_images(root / "images", rng, c)
    _write_bad_images(root / "bad", rng, c)

    # Valid images under names that are hard to print or to turn into output names.
    named = root / "named"
    (named / "pic[").mkdir(parents=True)
    c.named["markup_closing"] = named / "pic[" / "x].png"  # the path contains "[/x]"
    c.named["markup_style"] = named / "[red]styled.png"
    c.named["undecodable"] = named / UNDECODABLE
    for path in c.named.values():
        Image.fromarray(_noise(rng)).save(path)
    Image.new("RGB", (64, 48), "white").save(root / "white.png")
    c.images["white.png"] = root / "white.png"

    # Labelled folders: the good images of every kind, and one bad or oddly named file beside
    # a good one.
    sets = root / "sets"
    c.sets["good"] = _labelled_set(sets / "good", rng)
    c.sets["good_kinds"] = _labelled_set(
        sets / "good_kinds", rng, {name: c.images[name] for name in GOOD_IMAGES}
    )
    c.sets["with_every_bad_kind"] = _labelled_set(sets / "with_every_bad_kind", rng, c.bad)
    dst = _labelled_set(
        sets / "with_markup_names", rng, {"[red]styled.png": c.named["markup_style"]}
    )
    (dst / "cat" / "pic[").mkdir()
    (dst / "cat" / "pic[" / "x].png").write_bytes(c.named["markup_closing"].read_bytes())
    c.sets["with_markup_names"] = dst
    c.sets["with_undecodable_name"] = _labelled_set(
        sets / "with_undecodable_name", rng, {UNDECODABLE: c.named["undecodable"]}
    )
    markup_set = sets / "markup_labels" / "[red]dog"  # a class of classes/markup.txt
    markup_set.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(_noise(rng)).save(markup_set / name)
    c.sets["markup_labels"] = markup_set.parent
    nan_set = _labelled_set(sets / "nan_bright", rng)
    Image.new("RGB", (64, 48), "white").save(nan_set / "dog" / "white.png")
    c.sets["nan_bright"] = nan_set
    # Two images with the same stem: in two folders, and in one folder with two extensions.
    same = root / "same_stem"
    for sub in ("a", "b"):
        (same / sub).mkdir(parents=True)
        Image.fromarray(_noise(rng)).save(same / sub / "photo.png")
    Image.fromarray(_noise(rng)).save(same / "a" / "photo.jpg", quality=90)
    c.sets["same_stem"] = same

    _write_classes(root / "classes", c)
    _write_csvs(root / "csv", rng, c)
    _write_weights(root / "weights", c)
    _write_fifos(root / "fifo", rng, c)
    return c


def _write_classes(folder: Path, c: Corpus) -> None:
    folder.mkdir()
    files = {
        "markup": ("[/x]\n[red]dog\n$\\undefinedcmd$\n", "utf-8"),
        "short": ("cat\ndog\n", "utf-8"),
        "long": ("cat\ndog\nbird\nfish\n", "utf-8"),
        # Decoded right, these lists name the classes the corpus sets and commands use.
        "latin1": ("cat\ndog\ncafé niño\n", "latin-1"),
        "utf16": ("cat\ndog\ncafé niño\n", "utf-16"),
        "empty": ("", "utf-8"),
        "tsv_bad_index": ("index\tsynset\tname\nx\tn01\tcat\n1\tn02\tdog\n2\tn03\tbird\n", "utf-8"),
        "tsv_short_row": ("index\tsynset\tname\n0\tn01\tcat\n1\tn02\n2\tn03\tbird\n", "utf-8"),
        "binary": ("\x00\x01\x02\x03\n" * 3, "utf-8"),
    }
    for key, (text, encoding) in files.items():
        path = folder / f"{key}.txt"
        path.write_bytes(text.encode(encoding))
        c.classes[key] = path
    c.classes["directory"] = folder / "directory.txt"
    c.classes["directory"].mkdir()
    c.classes["loop"] = folder / "loop.txt"
    c.classes["loop"].symlink_to("loop.txt")
    c.classes["missing"] = folder / "missing.txt"


def _write_csvs(folder: Path, rng: np.random.Generator, c: Corpus) -> None:
    folder.mkdir()
    Image.fromarray(_noise(rng)).save(folder / "a.png")
    Image.fromarray(_noise(rng)).save(folder / "b.png")
    Image.fromarray(_noise(rng)).save(folder / "café.png")
    files = {
        "short_row": ("label,path\ncat,a.png\ndog\n", "utf-8"),
        "extra_fields": ("path,label\na.png,cat\nb.png,dog,surplus\n", "utf-8"),
        "no_header": ("a.png,cat\nb.png,dog\n", "utf-8"),
        "latin1": ("path,label\ncafé.png,cat\nb.png,dog\n", "latin-1"),
        "utf16": ("path,label\ncafé.png,cat\nb.png,dog\n", "utf-16"),
        "bom": ("path,label\na.png,cat\nb.png,dog\n", "utf-8-sig"),
        "empty": ("", "utf-8"),
        "header_only": ("path,label\n", "utf-8"),
        "markup_label": ("path,label\na.png,[/x]\n", "utf-8"),
        "nul": ("path,label\na.png,cat\x00\nb.png,dog\n", "utf-8"),
    }
    for key, (text, encoding) in files.items():
        path = folder / f"{key}.csv"
        path.write_bytes(text.encode(encoding))
        c.csv[key] = path


def _write_weights(folder: Path, c: Corpus) -> None:
    folder.mkdir()
    c.weights["empty"] = folder / "empty.pt"
    c.weights["empty"].write_bytes(b"")
    c.weights["garbage"] = folder / "garbage.pt"
    c.weights["garbage"].write_bytes(b"PK\x03\x04 not a zip archive at all" * 8)
    c.weights["directory"] = folder / "directory.pt"
    c.weights["directory"].mkdir()
    c.weights["missing"] = folder / "missing.pt"


def _write_fifos(folder: Path, rng: np.random.Generator, c: Corpus) -> None:
    folder.mkdir()
    for name in ("image.jpg", "classes.txt", "weights.pt", "model.pt", "data.csv"):
        os.mkfifo(folder / name)
        c.fifos[name] = folder / name
    dst = _labelled_set(folder / "set", rng)
    os.mkfifo(dst / "cat" / "fifo.jpg")
    c.sets["with_fifo"] = dst


# ------------------------------------------------------------------------------- running the CLI


@dataclass
class CliResult:
    """What a user sees from one command.

    Attributes:
        argv: the arguments after ``convlens``.
        code: the exit status (``None`` when an exception escaped or the process hung).
        out: standard output.
        err: standard error (with Python warnings appended as the interpreter would print them).
        crash: the traceback of an exception that escaped ``main`` ("Traceback ..."), or a note
            that the command hung.
        blocked: FIFOs the command opened for reading (it would have blocked forever).
    """

    argv: list[str]
    code: int | None
    out: str
    err: str
    crash: str | None = None
    blocked: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """Everything about the run, for an assertion message."""
        parts = [f"convlens {' '.join(map(repr, self.argv))}", f"exit code: {self.code}"]
        if self.crash:
            parts.append(f"crashed: {self.crash.strip().splitlines()[-1]}")
        if self.blocked:
            parts.append(f"blocked reading FIFO(s): {', '.join(self.blocked)}")
        parts += [f"stderr: {self.err.strip()!r}"[:2000], f"stdout: {self.out.strip()!r}"[:800]]
        return "\n".join(parts)


def _fresh_consoles() -> None:
    """Empty the buffers of convlens' rich consoles, as in a new process.

    A console whose write failed (e.g. a file name that cannot be encoded) keeps the failed
    text in its buffer and would fail again on its next print, in the next test.
    """
    from rich.console import Console

    for name, module in list(sys.modules.items()):
        if not name.startswith("convlens"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Console) and isinstance(getattr(value, "_buffer", None), list):
                del value._buffer[:]
                value._buffer_index = 0


def _call_main(args: list[str]) -> tuple[int | None, str | None, list[str]]:
    """Run ``main(args)``; returns (exit code, traceback text, formatted warnings)."""
    from convlens.cli import main

    _fresh_consoles()
    code: int | None = 0
    crash = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.simplefilter("ignore", category)
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # what the console script would show as a traceback
            code = None
            crash = "".join(traceback.format_exception(exc))
    shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught]
    return code, crash, shown


def run_cli(
    argv: Sequence[str], capsys, *, fifos: Sequence[Path] = (), timeout: float = 120.0
) -> CliResult:
    """Run ``convlens.cli.main(argv)`` in this process, as the console script would.

    Warnings are handled with Python's default filters (printed to stderr, once per place),
    not with the test suite's ``filterwarnings=error``, so that a warning is what the user
    would see, not an exception the user would never get.

    With ``fifos``, the command runs in a thread while this one watches the FIFOs: a FIFO that
    the command opens for reading (which blocks until a writer appears, i.e. forever for a user)
    is detected at once (a non-blocking open for writing succeeds only while a reader waits),
    recorded in :attr:`CliResult.blocked` and released with an empty write end so that the
    command can finish. A command still running after ``timeout`` seconds is reported as hung.
    """
    capsys.readouterr()
    args = [str(a) for a in argv]
    blocked: list[str] = []
    if not fifos:
        code, crash, shown = _call_main(args)
    else:
        box: dict[str, tuple[int | None, str | None, list[str]]] = {}
        thread = threading.Thread(target=lambda: box.update(r=_call_main(args)), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.05)
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody is reading it
                    continue
                os.close(fd)  # the reader gets end-of-file
                if str(fifo) not in blocked:
                    blocked.append(str(fifo))
        if thread.is_alive():
            code, crash, shown = None, f"hung: still running after {timeout:.0f} s", []
        else:
            code, crash, shown = box["r"]
    captured = capsys.readouterr()
    return CliResult(args, code, captured.out, captured.err + "".join(shown), crash, blocked)


_CHILD = """
import resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
torch.set_num_threads(1)
from convlens.cli import main
main(sys.argv[2:])
"""


@dataclass
class CliProcess:
    """A ``convlens`` command running in a child process (see :func:`start_cli_process`)."""

    argv: list[str]
    proc: subprocess.Popen


def start_cli_process(argv: Sequence[str], *, memory_limit: int = 0) -> CliProcess:
    """Start ``convlens ARGV`` in a child process (its own process group), without waiting.

    Args:
        argv: the arguments after ``convlens``.
        memory_limit: address-space limit in bytes for the child (0: none), so that an input
            that makes the command allocate without bound fails there, not on the machine.
    """
    args = [str(a) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(memory_limit), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    return CliProcess(args, proc)


def finish_cli_process(run: CliProcess, timeout: float) -> CliResult:
    """Wait for a child started by :func:`start_cli_process`; kill it after ``timeout`` s."""
    try:
        out, err = run.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        out, err = run.proc.communicate()
        return CliResult(
            run.argv,
            None,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            f"hung: still running after {timeout:.0f} s, killed",
        )
    text = err.decode(errors="replace")
    crash = text[text.index("Traceback") :] if "Traceback" in text else None
    return CliResult(run.argv, run.proc.returncode, out.decode(errors="replace"), text, crash)


# ----------------------------------------------------------------------------------- assertions


def _normal(text: str) -> str:
    return re.sub(r"[-_\s]+", " ", text.lower())


def assert_clean_error(result: CliResult, mentions: Iterable[str | tuple[str, ...]] = ()) -> None:
    """Bad input: exit code 2, no traceback, stderr exactly one non-empty line ``error: ...``.

    Args:
        result: the run.
        mentions: text the error line must contain (case, ``-``, ``_`` and spaces ignored),
            e.g. the option or file it is about; a tuple accepts any of its members.
    """
    why = result.describe()
    assert not result.blocked, f"opened a FIFO for reading (blocks forever)\n{why}"
    assert result.crash is None, f"traceback instead of an error line\n{why}"
    assert "Traceback" not in result.err + result.out, f"traceback printed\n{why}"
    assert result.code == 2, f"exit code {result.code}, expected 2\n{why}"
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{len(lines)} non-empty stderr lines, expected 1\n{why}"
    assert lines[0].startswith("error:"), f"stderr does not start with 'error:'\n{why}"
    for m in mentions:
        options = (m,) if isinstance(m, str) else m
        assert any(_normal(o) in _normal(lines[0]) for o in options), (
            f"the error line does not name {' or '.join(map(repr, options))}\n{why}"
        )


def assert_success(result: CliResult, outputs: Callable[[], Iterable[Path]] | None = None) -> None:
    """Good input: exit code 0, no traceback, and every expected output a non-empty file.

    Also fails on an empty artifact anywhere in the outputs' folders (a half-written file).
    """
    why = result.describe()
    assert not result.blocked, f"opened a FIFO for reading (blocks forever)\n{why}"
    assert result.crash is None, f"traceback\n{why}"
    assert "Traceback" not in result.err + result.out, f"traceback printed\n{why}"
    assert result.code == 0, f"exit code {result.code}, expected 0\n{why}"
    for path in outputs() if outputs is not None else ():
        assert path.is_file(), f"expected output {path} is missing\n{why}"
        assert path.stat().st_size > 0, f"output {path} is empty\n{why}"


ARTIFACT_SUFFIXES = frozenset({".png", ".gif", ".html", ".json", ".md", ".csv", ".sqlite"})


def empty_artifacts(folder: Path) -> list[Path]:
    """Artifacts (PNG, HTML, JSON, ...) of 0 bytes under ``folder``: half-written outputs."""
    if not folder.is_dir():
        return []
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in ARTIFACT_SUFFIXES and p.stat().st_size == 0
    ]
