"""Bad and unusual inputs through every command: one clean error line, or the right result.

The corpus (:mod:`tests.helpers.corpus`) is generated once per module into a temporary folder; each
case runs ``convlens.cli.main`` in-process with a tiny user model (``net.py:build``, three
classes, 32 px inputs) and checks what a user would see:

* bad input: exit code 2, stderr exactly one non-empty line starting with ``error:`` that names
  the input (the option, file or text at fault), no traceback, and nothing previously written
  lost;
* input that should work: exit code 0 and every expected output a non-empty file, no 0-byte
  artifact left behind.

Each case runs through every command that takes the option or input it is about; which options a
command takes is read from the command line itself, so a command that gains an option gains its
cases. Case ids read ``COMMAND-what``.

Decisions on expected behaviour (issue 14):

* A class list whose length differs from the model's outputs is an error (exit 2), for every
  command that takes ``--classes`` (``predict`` used to raise ``IndexError``, ``explain`` to
  drop the names silently).
* Class names and file names are text, never markup: names with ``[/x]``, ``[red]`` or
  ``$...$`` must be accepted and printed as written.
* Class lists and CSV files that are not UTF-8 (latin-1, UTF-16) may be decoded or refused
  with one error line, but never crash or come out garbled; a UTF-8 BOM (as written by
  spreadsheet programs) is accepted.
* A CSV row with fewer fields than the header, or more (an unquoted comma), is an error naming
  the file.
* Inputs that are not regular files (a FIFO) are never opened for reading: a FIFO given as an
  image, class list, weights, model or CSV is an error, and one inside a folder is skipped like
  any unreadable file.
* In a folder, ``features`` and ``analyze`` skip an unreadable file (``analyze`` records it as a
  failure) and finish; ``evaluate`` may skip it or stop with one error line naming it.
* A file name with a byte that is not UTF-8 is a valid image: every command processes it (in
  ``analyze`` it is counted, as a prediction or as a failure with a reason).
* Non-finite numbers are errors: ``--std 0``, NaN or infinite ``--mean``/``--std``/``--fill``/
  ``--alpha``/``--lr``/``--step-size``; a model whose outputs are NaN is an error in
  ``predict``, ``explain``, ``evaluate`` and ``classviz``, and in ``analyze`` the images with
  NaN outputs are recorded as failures while the run finishes.
* Counts and sizes must be positive (``--batch-size``, ``--top``, ``--size``, ``--resize``,
  ``--patch``, ``--stride``, ``--top-k``, ``--steps``, ``--limit``, ``--num-channels``,
  ``--octaves``, ``--max-size``, ``--samples``, ``--sanity-images``, ``--octave-scale``);
  ``--workers``, ``--top-errors`` and ``--jitter`` may be 0 but not negative; a channel must
  exist in the layer; ``--alpha`` lies in [0, 1]; ``--device`` is ``cpu``, ``cuda[:N]`` or
  ``auto``.
* Two input images with the same stem (``a/photo.png`` and ``b/photo.png``, or ``photo.png``
  and ``photo.jpg``) get distinct output files in ``explain`` (whatever the naming rule): every
  file the run writes is still there afterwards.
* An animated GIF is read as its first frame; EXIF orientation is applied; huge images are
  decoded reduced; 16-bit, CMYK, palette, alpha, bilevel and float images are converted.
* ``--out`` naming an existing file is an error and the file is left as it was.

Click's own usage errors (an unknown option, ``--top abc``, a missing required option) print
click's usage text; for them only exit code 2 and no traceback are checked.

Property-based tests (hypothesis) check the parsers of option text: for any text they return a
valid value or raise a ``ConvlensError``, never another exception.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from convlens.errors import ConvlensError
from tests.helpers.corpus import (
    BAD_IMAGES,
    CLASSES,
    GOOD_IMAGES,
    HUGE_JPEG,
    HUGE_PNG,
    CliResult,
    Corpus,
    assert_clean_error,
    assert_success,
    build_corpus,
    empty_artifacts,
    finish_cli_process,
    run_cli,
    start_cli_process,
)

COMMANDS = (
    "predict",
    "explain",
    "layers",
    "features",
    "analyze",
    "evaluate",
    "classviz",
    "featviz",
    "dream",
)
DIRECT = ("predict", "explain", "dream")  # take image files
BATCH = ("features", "analyze", "evaluate")  # take a folder (or CSV)


def _command_options() -> dict[str, frozenset[str]]:
    """Every option each command takes, read from the command line definition."""
    from typer.main import get_command

    from convlens.cli import app

    group = get_command(app)
    return {
        name: frozenset(o for p in cmd.params for o in (*p.opts, *p.secondary_opts))
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
    }


OPTIONS = _command_options()


def takes(option: str) -> list[str]:
    """The commands that take ``option`` (``layers`` takes the model as its argument)."""
    return [c for c in COMMANDS if option in OPTIONS[c] or (c, option) == ("layers", "--model")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


# ------------------------------------------------------------------------------- command lines

Value = str | Path | bool | list[str] | None


def _base(c: Corpus, command: str, out: Path) -> dict[str, Value]:
    """Options of a quick, valid run of ``command`` with the tiny model."""
    model: dict[str, Value] = {"--model": c.model(), "--classes": c.labels, "--size": "32"}
    return {
        "predict": {**model, "--top": "3"},
        "explain": {
            **model,
            "--methods": "gradcam",
            "--patch": "8",
            "--stride": "8",
            "--out": out,
        },
        "layers": {"--model": c.model(), "--size": "32"},
        "features": {**model, "--layer": "2", "--top": "2", "--num-channels": "2", "--out": out},
        "analyze": {**model, "--no-faithfulness": True, "--top-errors": "1", "--out": out},
        "evaluate": {**model, "--methods": "gradcam", "--steps": "2", "--out": out},
        "classviz": {**model, "--class": "cat", "--steps": "2", "--out": out},
        "featviz": {**model, "--layer": "2", "--channels": "0-1", "--steps": "2", "--out": out},
        "dream": {
            "--model": c.model(),
            "--layer": "2",
            "--octaves": "1",
            "--steps": "1",
            "--max-size": "64",
            "--out": out,
        },
    }[command]


def _default_inputs(c: Corpus, command: str) -> list[Path]:
    if command in DIRECT:
        return [c.images["rgb.png"]]
    if command in BATCH:
        return [c.sets["good"]]
    return []


def command_line(
    c: Corpus,
    command: str,
    out: Path,
    inputs: list[Path | str] | None = None,
    options: dict[str, Value] | None = None,
    *,
    strict: bool = True,
) -> list[str]:
    """``[command, inputs..., options...]``: the base options updated with ``options``
    (``None`` drops an option, ``True`` is a flag, a list repeats it); with ``strict``, every
    option must be one the command takes."""
    opts = {**_base(c, command, out), **(options or {})}
    unknown = [k for k in opts if command not in takes(k)]
    assert not (strict and unknown), f"{command} takes no {unknown}"
    args = [command]
    if command == "layers":
        args.append(str(opts.pop("--model")))
    args += [str(p) for p in (inputs if inputs is not None else _default_inputs(c, command))]
    for key, value in opts.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append(key)
        elif isinstance(value, list):
            for v in value:
                args += [key, str(v)]
        else:
            args += [key, str(value)]
    return args


# ------------------------------------------------------------------------------------ the cases

Check = Callable[[Corpus, CliResult, Path], None]


@dataclass(frozen=True)
class Case:
    """One command run on one input.

    Attributes:
        id: ``COMMAND-what``, shown by pytest.
        command: the command.
        expect: ``"error"`` (exit 2, one line), ``"ok"`` (exit 0, outputs), ``"clean"`` (either
            of the two: behaviour left open, see the module docstring) or ``"usage"`` (click's
            usage error: exit 2, no traceback).
        options: ``(corpus, out) -> options`` replacing the base options.
        inputs: ``corpus -> inputs`` replacing the default input.
        mentions: what the error line must name (a tuple inside accepts any of its members).
        check: further checks after the run, whatever its outcome.
        setup: ``out -> None`` run before the command (e.g. to put a file where --out points).
        out: the output folder relative to the test's temporary folder.
        fifos: whether to watch the corpus' FIFOs (and fail when one is opened for reading).
        slow: uses the default model.
    """

    id: str
    command: str
    expect: str
    options: Callable[[Corpus, Path], dict[str, Value]] | None = None
    inputs: Callable[[Corpus], list[Path | str]] | None = None
    mentions: tuple[str | tuple[str, ...], ...] = ()
    check: Check | None = None
    setup: Callable[[Path], None] | None = None
    out: str = "out"
    fifos: bool = False
    slow: bool = False

    def __repr__(self) -> str:  # short, for failure reports
        return f"Case({self.id!r})"


def _outputs(command: str, out: Path, result: CliResult) -> list[Path]:
    """The files a successful run of ``command`` must have written."""
    if command in ("predict", "layers"):
        assert result.out.strip(), f"nothing printed\n{result.describe()}"
        return []
    fixed = {
        "features": ["index.html"],
        "analyze": ["metrics.json", "predictions.sqlite", "report/index.html"],
        "evaluate": ["metrics.md", "metrics.csv", "curves.png"],
    }.get(command, [])
    pattern = {
        "explain": "*_panel.png",
        "features": "*.png",
        "classviz": "classviz_*.png",
        "featviz": "featviz_*.png",
        "dream": "*_dream.png",
    }.get(command)
    found = sorted(out.rglob(pattern)) if pattern else []
    assert found or not pattern, f"no {pattern} written under {out}\n{result.describe()}"
    return [out / f for f in fixed] + found


def _verify(case: Case, c: Corpus, result: CliResult, out: Path) -> None:
    if case.expect == "usage":
        why = result.describe()
        assert result.crash is None and "Traceback" not in result.err, why
        assert result.code == 2, why
        assert all(str(m).lower() in result.err.lower() for m in case.mentions), why
    elif case.expect == "error" or (case.expect == "clean" and result.code != 0):
        assert_clean_error(result, case.mentions)
    else:
        assert_success(result, lambda: _outputs(case.command, out, result))
        assert not empty_artifacts(out), f"0-byte artifacts {empty_artifacts(out)}"
    if case.check is not None:
        case.check(c, result, out)


# checks ------------------------------------------------------------------------------------


def printed(*texts: str) -> Check:
    """The texts appear literally in stdout, wrapped or not (when the run succeeded)."""

    def check(c: Corpus, result: CliResult, out: Path) -> None:
        if result.code == 0:
            flat = "".join(result.out.split())  # tables wrap long cells over lines
            for t in texts:
                assert "".join(t.split()) in flat, f"{t!r} not printed\n{result.describe()}"

    return check


def reported(*texts: str) -> Check:
    """The texts appear literally in stderr, wrapped or not (when the run succeeded)."""

    def check(c: Corpus, result: CliResult, out: Path) -> None:
        if result.code == 0:
            flat = "".join(result.err.split())
            for t in texts:
                assert "".join(t.split()) in flat, f"{t!r} not reported\n{result.describe()}"

    return check


def analysed(*, images: int | None = None, failures: int | None = None) -> Check:
    """``analyze`` counted ``images`` readable images and ``failures`` failures."""

    def check(c: Corpus, result: CliResult, out: Path) -> None:
        if result.code != 0:
            return
        m = json.loads((out / "metrics.json").read_text())
        got = (m["images"], m["failures"])
        if images is not None:
            assert m["images"] + m["failures"] == images, f"(images, failures) = {got}"
        if failures is not None:
            assert m["failures"] == failures, f"(images, failures) = {got}\n{result.describe()}"

    return check


def evaluated(n: int) -> Check:
    """``evaluate`` scored ``n`` distinct images."""

    def check(c: Corpus, result: CliResult, out: Path) -> None:
        if result.code != 0:
            return
        with (out / "metrics.csv").open(newline="", errors="replace") as fh:
            images = {row["image"] for row in csv.DictReader(fh)}
        assert len(images) == n, f"{len(images)} images scored, expected {n}: {sorted(images)}"

    return check


def nothing_skipped(c: Corpus, result: CliResult, out: Path) -> None:
    assert "skipped" not in result.err, f"images skipped\n{result.describe()}"


def panels(n: int, files: int) -> Check:
    """``explain`` left ``n`` panels and ``files`` files in total: none overwritten."""

    def check(c: Corpus, result: CliResult, out: Path) -> None:
        # Hidden files are bookkeeping (.convlens-outputs.json: which input owns which name).
        written = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
        found = [p for p in written if p.name.endswith("_panel.png")]
        names = [str(p.relative_to(out)) for p in written]
        assert len(found) == n, f"{len(found)} panels, expected {n}: {names}"
        assert len(written) == files, f"{len(written)} files, expected {files}: {names}"

    return check


def _distinct_files(folder: Path) -> int:
    return len({p.resolve() for p in folder.rglob("*") if p.is_file()})


# case tables -------------------------------------------------------------------------------


EXPLAINED_KINDS = (
    "rgb16.png",
    "cmyk.jpg",
    "palette_transparent.png",
    "animated.gif",
    "exif_rotated.jpg",
    "huge_jpeg.jpg",
    "float_nan.tif",
)
"""The good kinds also run through ``explain`` one by one (each costs a rendered panel; all kinds
are read by the same ``load_image`` that ``predict`` and ``dream`` run on every kind, and the
batch commands read every kind from one folder)."""


def _image_cases() -> Iterator[Case]:
    for name in GOOD_IMAGES:
        for cmd in DIRECT:
            if cmd == "explain" and name not in EXPLAINED_KINDS:
                continue
            yield Case(
                f"{cmd}-image-{name}",
                cmd,
                "ok",
                inputs=lambda c, n=name: [c.images[n]],
                check=printed(name) if cmd == "predict" else None,
            )
    good_kinds = {
        "features": nothing_skipped,
        "analyze": lambda c, r, o: analysed(
            images=_distinct_files(c.sets["good_kinds"]), failures=0
        )(c, r, o),
        "evaluate": lambda c, r, o: evaluated(_distinct_files(c.sets["good_kinds"]))(c, r, o),
    }
    for cmd, check in good_kinds.items():
        yield Case(
            f"{cmd}-folder-of-every-good-kind",
            cmd,
            "ok",
            inputs=lambda c: [c.sets["good_kinds"]],
            check=check,
        )
    for name in BAD_IMAGES:
        for cmd in DIRECT:
            yield Case(
                f"{cmd}-image-{name}",
                cmd,
                "error",
                inputs=lambda c, n=name: [c.bad[n]],
                mentions=(name,),
            )
    # One folder: two good images and every bad kind (a folder named x.jpg is not listed).
    listed = len(BAD_IMAGES) - 1
    bad_kinds = {
        "features": None,
        "analyze": analysed(images=2 + listed, failures=listed),
        "evaluate": evaluated(2),
    }
    for cmd, check in bad_kinds.items():
        yield Case(
            f"{cmd}-folder-with-every-bad-kind",
            cmd,
            "clean" if cmd == "evaluate" else "ok",
            inputs=lambda c: [c.sets["with_every_bad_kind"]],
            mentions=(BAD_IMAGES,),
            check=check,
        )
    shown = {"markup_closing": "[/x]", "markup_style": "[red]styled.png", "undecodable": "bad"}
    for key, text in shown.items():
        for cmd in DIRECT:
            check = {
                "predict": printed(text),
                "dream": reported("[red]styled_dream.png") if key == "markup_style" else None,
            }.get(cmd)
            yield Case(
                f"{cmd}-file-name-{key}",
                cmd,
                "ok",
                inputs=lambda c, k=key: [c.named[k]],
                check=check,
            )
    for key, failures in (("markup_names", 0), ("undecodable_name", None)):
        checks = {
            "features": None,
            "analyze": analysed(images=4 if key == "markup_names" else 3, failures=failures),
            "evaluate": evaluated(4 if key == "markup_names" else 3),
        }
        for cmd, check in checks.items():
            yield Case(
                f"{cmd}-folder-with-{key.replace('_', '-')}",
                cmd,
                "ok",
                inputs=lambda c, k=key: [c.sets[f"with_{k}"]],
                check=check,
            )
    yield Case(
        "predict-default-model-odd-images",
        "predict",
        "ok",
        options=lambda c, o: {"--model": None, "--classes": None, "--size": None},
        inputs=lambda c: [c.named["markup_closing"], c.images["cmyk.jpg"], c.images["rgb16.png"]],
        check=printed("[/x]", "cmyk.jpg", "rgb16.png"),
        slow=True,
    )


def _fifo_cases() -> Iterator[Case]:
    for cmd in DIRECT:
        yield Case(
            f"{cmd}-fifo-as-image",
            cmd,
            "error",
            inputs=lambda c: [c.fifos["image.jpg"]],
            mentions=("image.jpg",),
            fifos=True,
        )
    for option, name in (("--classes", "classes.txt"), ("--weights", "weights.pt")):
        for cmd in takes(option):
            yield Case(
                f"{cmd}-fifo-as-{option[2:]}",
                cmd,
                "error",
                options=lambda c, o, opt=option, n=name: {opt: c.fifos[n]},
                mentions=(name,),
                fifos=True,
            )
    for cmd in takes("--model"):
        yield Case(
            f"{cmd}-fifo-as-model",
            cmd,
            "error",
            options=lambda c, o: {"--model": c.fifos["model.pt"]},
            mentions=("model.pt",),
            fifos=True,
        )
    for cmd in ("analyze", "evaluate"):
        yield Case(
            f"{cmd}-fifo-as-csv",
            cmd,
            "error",
            inputs=lambda c: [c.fifos["data.csv"]],
            mentions=("data.csv",),
            fifos=True,
        )
    checks = {"features": None, "analyze": analysed(images=3, failures=1), "evaluate": None}
    for cmd, check in checks.items():
        yield Case(
            f"{cmd}-folder-with-fifo",
            cmd,
            "clean" if cmd == "evaluate" else "ok",
            inputs=lambda c: [c.sets["with_fifo"]],
            mentions=("fifo.jpg",),
            check=check,
            fifos=True,
        )


CLASS_LIST_ERRORS = {
    "short": "short.txt",  # 2 names for 3 outputs
    "long": "long.txt",  # 4 names for 3 outputs
    "empty": "empty.txt",
    "directory": "directory.txt",
    "loop": "loop.txt",  # a symlink to itself
    "missing": "missing.txt",
    "tsv_bad_index": "tsv_bad_index.txt",  # index column 'x'
    "tsv_short_row": "tsv_short_row.txt",  # a row without its name
}


def _class_list_cases() -> Iterator[Case]:
    for key, name in CLASS_LIST_ERRORS.items():
        for cmd in takes("--classes"):
            yield Case(
                f"{cmd}-classes-{key}",
                cmd,
                "error",
                options=lambda c, o, k=key: {"--classes": c.classes[k]},
                mentions=(name,),
            )
    for key, mode in (("latin1", "error"), ("utf16", "ok")):  # UTF-16 has a BOM: decoded
        for cmd in takes("--classes"):
            yield Case(
                f"{cmd}-classes-{key}",
                cmd,
                mode,
                options=lambda c, o, k=key: {"--classes": c.classes[k]},
                mentions=(f"{key}.txt",),
                check=printed("café", "niño") if cmd == "predict" else None,
            )
    markup = ("[/x]", "[red]dog", "$\\undefinedcmd$")
    extra: dict[str, dict[str, Value]] = {
        "explain": {"--top-k": "3"},
        "classviz": {"--class": ["[/x]", "1", "2"]},
    }
    for cmd in takes("--classes"):
        yield Case(
            f"{cmd}-class-names-with-markup",
            cmd,
            "ok",
            options=lambda c, o, cmd=cmd: {"--classes": c.classes["markup"], **extra.get(cmd, {})},
            # The labelled folder's class subfolder is named "[red]dog".
            inputs=(lambda c: [c.sets["markup_labels"]]) if cmd in BATCH else None,
            check=printed(*markup) if cmd in ("predict", "classviz") else None,
        )
    yield Case(
        "explain-target-is-a-class-named-with-markup",
        "explain",
        "ok",
        options=lambda c, o: {"--classes": c.classes["markup"], "--target": "[/x]"},
    )


CSV_ERRORS = {
    "short_row": "short_row.csv",
    "extra_fields": "extra_fields.csv",
    "no_header": "no_header.csv",
    "empty": "empty.csv",
    "header_only": "header_only.csv",
    "nul": "nul.csv",
    "markup_label": "[/x]",  # a label that is no class, written as markup
}


def _csv_cases() -> Iterator[Case]:
    for cmd in ("analyze", "evaluate"):
        for key, mention in CSV_ERRORS.items():
            yield Case(
                f"{cmd}-csv-{key}",
                cmd,
                "error",
                inputs=lambda c, k=key: [c.csv[k]],
                mentions=(mention,),
            )
        check = analysed(images=2, failures=0) if cmd == "analyze" else evaluated(2)
        for key, mode in (("latin1", "error"), ("utf16", "ok")):
            yield Case(
                f"{cmd}-csv-{key}",
                cmd,
                mode,
                inputs=lambda c, k=key: [c.csv[k]],
                mentions=(f"{key}.csv",),
                check=check,
            )
        yield Case(f"{cmd}-csv-bom", cmd, "ok", inputs=lambda c: [c.csv["bom"]], check=check)


NUMBERS: dict[str, tuple[str, ...]] = {
    "--batch-size": ("0", "-1"),
    "--top": ("0", "-1"),
    "--size": ("0", "-1"),
    "--resize": ("0", "-1"),
    "--patch": ("0", "-1"),
    "--stride": ("0", "-1"),
    "--top-k": ("0", "-1"),
    "--steps": ("-1",),  # 0 is valid: the starting image (or, for evaluate, checked apart)
    "--limit": ("0", "-1"),
    "--workers": ("-1",),
    "--num-channels": ("0", "-1"),
    "--top-errors": ("-1",),
    "--octaves": ("0", "-1"),
    "--octave-scale": ("0", "-1"),
    "--max-size": ("0", "-1"),
    "--jitter": ("-1",),
    "--channel": ("-1", "99"),
    "--samples": ("0", "-1"),
    "--sanity-images": ("0", "-1"),
    "--lr": ("-1", "nan"),
    "--step-size": ("-1", "nan"),
    "--alpha": ("-1", "2", "nan"),
    "--fill": ("nan", "inf"),
    "--std": ("0", "1,0,1", "nan", "inf"),
    "--mean": ("nan", "inf,0,0"),
    "--device": ("foo", "mps", ""),
}
"""Invalid numbers (and device names) for each option."""

NEEDS: dict[str, dict[str, Value]] = {
    "--sanity-images": {"--sanity": True},
    **{o: {"--methods": "gradcam,occlusion"} for o in ("--patch", "--stride", "--fill")},
}
"""Options an option needs to have an effect."""

CALLED: dict[str, tuple[str, ...]] = {"--lr": ("lr", "learning rate")}
"""How an error line may name an option (default: its name)."""


def _number_cases() -> Iterator[Case]:
    for option, values in NUMBERS.items():
        for value in values:
            for cmd in takes(option):
                yield Case(
                    f"{cmd}-{option[2:]}={value}",
                    cmd,
                    "error",
                    options=lambda c, o, opt=option, v=value: {opt: v, **NEEDS.get(opt, {})},
                    mentions=(CALLED.get(option, (option[2:],)),),
                )


TEXTS: list[tuple[str, str, tuple[str, ...]]] = [
    *(
        (opt, text, mention)
        for opt in ("--target", "--class")
        for text, mention in (
            ("[/x]", ("[/x]",)),
            ("dgo", ("dgo",)),
            ("99", ("99",)),
            ("-1", ("-1",)),
            ("²", ("²",)),
            ("", ()),
        )
    ),
    ("--layer", "[/x]", ("[/x]",)),
    ("--layer", "nope", ("nope",)),
    ("--layer", "2@99", ("99",)),
    ("--layer", "2@-99", ("-99",)),
    ("--layer", "2@²", ("²",)),
    ("--layer", "", ()),
    ("--methods", "[/x]", ("[/x]",)),
    ("--methods", "nope", ("nope",)),
    ("--methods", "", ("methods",)),
    ("--methods", ",", ("methods",)),
    ("--channels", "[/x]", ("[/x]",)),
    ("--channels", "abc", ("abc",)),
    ("--channels", "5-1", ("5-1",)),
    ("--channels", "99", ("99",)),
    ("--channels", "-1", ("-1",)),
    ("--rule", "[/x]", ("[/x]",)),
    ("--crop", "[/x]", ("[/x]",)),
    ("--preset", "[/x]", ("[/x]",)),
    ("--cmap", "[/x]", ("[/x]",)),
    ("--cmap", "nope", ("nope",)),
    ("--fill", "[/x]", ("[/x]",)),
    ("--method-option", "[/x].patch=1", ("[/x]",)),
    ("--method-option", "gradcam.[/x]=1", ("[/x]",)),
    ("--method-option", "occlusion.patch=[/x]", ("[/x]",)),
    ("--method-option", "nope.x=1", ("nope",)),
    ("--method-option", "occlusion.patch=abc", ("abc",)),
    ("--method-option", "occlusion.patch=0", ("patch",)),
    ("--method-option", "occlusion.stride=-1", ("stride",)),
    ("--method-option", "noequals", ("noequals",)),
]
"""Unknown names, malformed text and text with markup for the options that take text."""

TEXT_NEEDS: dict[str, dict[str, Value]] = {
    "--method-option": {"--methods": "gradcam,occlusion"},
    "--fill": {"--methods": "gradcam,occlusion"},
}


def _text_cases() -> Iterator[Case]:
    for option, text, mention in TEXTS:
        for cmd in takes(option):
            yield Case(
                f"{cmd}-{option[2:]}={text!r}",
                cmd,
                "error",
                options=lambda c, o, opt=option, t=text: {opt: t, **TEXT_NEEDS.get(opt, {})},
                mentions=mention,
            )


MODELS: dict[str, tuple[Callable[[Corpus], dict[str, Value]], str]] = {
    "model-file-missing": (lambda c: {"--model": f"{c.root / 'missing.py'}:build"}, "missing.py"),
    "model-unknown-name": (lambda c: {"--model": "nope"}, "nope"),
    "model-unknown-zoo": (lambda c: {"--model": "timm:nope"}, "nope"),  # or timm is missing
    "model-unknown-factory": (lambda c: {"--model": c.model("nope")}, "nope"),
    "model-garbage-file": (lambda c: {"--model": c.weights["garbage"]}, "garbage.pt"),
    "weights-empty": (lambda c: {"--weights": c.weights["empty"]}, "empty.pt"),
    "weights-garbage": (lambda c: {"--weights": c.weights["garbage"]}, "garbage.pt"),
    "weights-directory": (lambda c: {"--weights": c.weights["directory"]}, "directory.pt"),
    "weights-missing": (lambda c: {"--weights": c.weights["missing"]}, "missing.pt"),
}


def _model_cases() -> Iterator[Case]:
    for key, (opts, mention) in MODELS.items():
        for cmd in takes(f"--{key.split('-')[0]}"):
            yield Case(
                f"{cmd}-{key}",
                cmd,
                "error",
                options=lambda c, o, f=opts: f(c),
                mentions=(mention,),
            )
    for cmd in ("predict", "explain", "evaluate", "classviz"):
        yield Case(
            f"{cmd}-model-outputs-nan",
            cmd,
            "error",
            options=lambda c, o: {"--model": c.model("build_nan")},
            mentions=(("nan", "finite"),),
        )
    yield Case(
        "analyze-model-outputs-nan-for-one-image",
        "analyze",
        "ok",
        options=lambda c, o: {"--model": c.model("build_nan_bright")},
        inputs=lambda c: [c.sets["nan_bright"]],
        check=analysed(images=3, failures=1),
    )
    yield Case(
        "analyze-model-outputs-nan-for-every-image",
        "analyze",
        "clean",
        options=lambda c, o: {"--model": c.model("build_nan")},
        mentions=(("nan", "finite"),),
        check=analysed(images=2, failures=2),
    )


def _keep(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"written earlier, must survive")


def _kept(c: Corpus, result: CliResult, out: Path) -> None:
    assert out.read_bytes() == b"written earlier, must survive", "the existing file was changed"


def _output_cases() -> Iterator[Case]:
    for cmd in takes("--out"):
        yield Case(f"{cmd}-out-folder-with-markup", cmd, "ok", out="out[/x]")
        yield Case(
            f"{cmd}-out-is-an-existing-file",
            cmd,
            "error",
            setup=_keep,
            out="existing.png",
            mentions=("existing.png",),
            check=_kept,
        )
    yield Case(
        "explain-same-stem-in-two-folders",
        "explain",
        "ok",
        inputs=lambda c: [c.sets["same_stem"] / "a/photo.png", c.sets["same_stem"] / "b/photo.png"],
        check=panels(2, files=4),  # per image: the panel and the Grad-CAM overlay
    )
    yield Case(
        "explain-same-stem-two-extensions",
        "explain",
        "ok",
        inputs=lambda c: [c.sets["same_stem"] / "a/photo.png", c.sets["same_stem"] / "a/photo.jpg"],
        check=panels(2, files=4),
    )


def _usage_cases() -> Iterator[Case]:
    yield Case(
        "predict-top=abc", "predict", "usage", lambda c, o: {"--top": "abc"}, mentions=("top",)
    )
    yield Case(  # no --layer: the layer Grad-CAM uses, said on stderr
        "features-without-layer",
        "features",
        "ok",
        lambda c, o: {"--layer": None},
        check=reported("(the default; choose others with --layer)"),
    )
    yield Case(
        "predict-unknown-option",
        "predict",
        "usage",
        lambda c, o: {"--no-such-option": "1"},
        mentions=("no-such-option",),
    )


def _all_cases() -> list[Case]:
    cases = [
        *_image_cases(),
        *_fifo_cases(),
        *_class_list_cases(),
        *_csv_cases(),
        *_number_cases(),
        *_text_cases(),
        *_model_cases(),
        *_output_cases(),
        *_usage_cases(),
    ]
    ids = [k.id for k in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = _all_cases()


@pytest.mark.parametrize(
    "case",
    [pytest.param(k, id=k.id, marks=[pytest.mark.slow] if k.slow else []) for k in CASES],
)
def test_command(case: Case, corpus: Corpus, tmp_path: Path, capsys) -> None:
    """One command on one bad or unusual input: the outcome the module docstring describes."""
    out = tmp_path / case.out
    if case.setup is not None:
        case.setup(out)
    argv = command_line(
        corpus,
        case.command,
        out,
        case.inputs(corpus) if case.inputs else None,
        case.options(corpus, out) if case.options else None,
        strict=case.expect != "usage",
    )
    fifos = [*corpus.fifos.values(), corpus.sets["with_fifo"] / "cat" / "fifo.jpg"]
    result = run_cli(argv, capsys, fifos=fifos if case.fifos else ())
    _verify(case, corpus, result, out)


def test_every_command_is_covered() -> None:
    """Each command of the CLI (but ``demo`` and ``methods``) is run on bad input here;
    ``serve``, which runs until stopped on good input, in ``tests/serve/test_init.py``."""
    assert set(OPTIONS) - {"demo", "methods", "serve"} == set(COMMANDS)
    assert {k.command for k in CASES} == set(COMMANDS)


# A channel range of 10^11 indices must be refused, not expanded: run in a child process
# with a 4 GiB address-space limit so that an expansion fails there, not on the machine.
@pytest.mark.parametrize("command", ["features", "featviz"])
def test_a_huge_channel_range_is_refused_without_expanding_it(
    command: str, corpus: Corpus, tmp_path: Path
) -> None:
    argv = command_line(corpus, command, tmp_path / "out", None, {"--channels": "0-99999999999"})
    result = finish_cli_process(start_cli_process(argv, memory_limit=4 << 30), timeout=180)
    assert_clean_error(result, mentions=(("channel",),))


# ------------------------------------------------------- the image cases that already work, read


def test_an_animated_gif_is_read_as_its_first_frame(corpus: Corpus) -> None:
    from convlens.images import load_image

    got = np.asarray(load_image(corpus.images["animated.gif"]))
    assert np.array_equal(got, corpus.frames["first"])
    assert not np.array_equal(got, corpus.frames["second"])


def test_exif_orientation_is_applied(corpus: Corpus) -> None:
    from convlens.images import load_image

    img = np.asarray(load_image(corpus.images["exif_rotated.jpg"]))
    assert img.shape == (64, 48, 3)  # stored 64 wide x 48 high, orientation 6
    # The stored top-left marker ends up top-right after a 90° clockwise rotation.
    assert img[:6, -6:].min() > 200


def test_huge_images_are_decoded_reduced(corpus: Corpus) -> None:
    from convlens.images import load_image

    for name, full in (("huge_jpeg.jpg", HUGE_JPEG), ("huge_png.png", HUGE_PNG)):
        img = load_image(corpus.images[name])
        assert max(img.size) == 4096, name
        assert abs((img.size[0] / img.size[1]) / (full[0] / full[1]) - 1) < 0.01, name


def test_sixteen_bit_images_keep_their_brightness(corpus: Corpus) -> None:
    from PIL import Image

    from convlens.images import load_image

    with Image.open(corpus.images["gray16.png"]) as im:
        raw = np.asarray(im).astype(np.float64)
    got = np.asarray(load_image(corpus.images["gray16.png"]))[..., 0].astype(np.float64)
    assert np.abs(got - raw / 257).max() <= 1


# ------------------------------------------------------------------------ property-based tests

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Few examples, no deadline, no example database on disk, the same examples on every run."""

TEXT = st.text(max_size=30)
NUMERIC_TEXT = st.text(alphabet="0123456789-+.,eEnaifINF ²٣_", max_size=16)


@FAST
@given(st.one_of(TEXT, NUMERIC_TEXT))
@example("nan")
@example("1,2")
@example("٣")
@example("1e999")
def test_parse_triple_returns_three_numbers_or_raises_convlens_error(text: str) -> None:
    from convlens.cli.options import parse_triple

    try:
        value = parse_triple(text, "std")
    except ConvlensError:
        return
    assert isinstance(value, tuple) and len(value) == 3
    assert all(isinstance(v, float) and math.isfinite(v) for v in value)


@FAST
@given(st.one_of(TEXT, st.sampled_from(["cpu", "cuda", "auto", "mps", "meta", "cpu:1", ""])))
@example("foo")
@example("cuda:x")
def test_parse_device_returns_a_usable_device_or_raises_convlens_error(text: str) -> None:
    from convlens.cli.options import parse_device

    try:
        dev = parse_device(text)
    except ConvlensError:
        return
    assert dev.type in ("cpu", "cuda"), dev
    torch.zeros(1, device=dev)


def _method_option_specs() -> st.SearchStrategy[str]:
    from convlens.methods import METHODS
    from convlens.methods.options import method_options

    names = sorted(METHODS)
    options = sorted({o for n in names for o in method_options(n)})
    value = st.one_of(
        TEXT, NUMERIC_TEXT, st.sampled_from(["true", "none", "0", "-1", "nan", "inf", "1,2"])
    )
    structured = st.builds(
        lambda m, o, v: f"{m}.{o}={v}",
        st.one_of(st.sampled_from(names), TEXT),
        st.one_of(st.sampled_from(options), TEXT),
        value,
    )
    return st.one_of(structured, TEXT)


@FAST
@given(st.lists(_method_option_specs(), max_size=3))
@example(["occlusion.patch=0"])
@example(["occlusion.patch=nan"])
@example(["[/x].patch=1"])
def test_method_options_parse_and_build_or_raise_convlens_error(specs: list[str]) -> None:
    from convlens.methods.options import build_methods, parse_method_options

    try:
        parsed = parse_method_options(specs)
        built = build_methods(parsed)
    except ConvlensError:
        return
    assert set(built) == set(parsed)


_CHANNEL_TEXT = st.text(alphabet="0123456789-, auto", max_size=9)


def _few_digits(text: str) -> bool:
    # No range of more than about a million channels (the unbounded case runs in a child
    # process, test_a_huge_channel_range_is_refused_without_expanding_it).
    return sum(ch.isdigit() for ch in text) <= 6


@FAST
@given(st.one_of(TEXT, _CHANNEL_TEXT).filter(_few_digits))
@example("²")
@example("0-3,8")
@example(" auto ")
def test_feature_channel_text_parses_or_raises_convlens_error(text: str) -> None:
    from convlens.features.browser import parse_channels

    try:
        value = parse_channels(text)
    except ConvlensError:
        return
    if isinstance(value, str):
        assert value == "auto"
    else:
        assert value and all(isinstance(v, int) and v >= 0 for v in value)


@FAST
@given(st.one_of(TEXT, _CHANNEL_TEXT).filter(_few_digits))
@example("²")
@example("3,5,9")
def test_synthesis_channel_text_parses_or_raises_convlens_error(text: str) -> None:
    from convlens.cli.synthesis import parse_channels

    try:
        value = parse_channels(text)
    except ConvlensError:
        return
    assert value and all(isinstance(v, int) and v >= 0 for v in value)


TARGET_TEXT = st.one_of(
    TEXT,
    NUMERIC_TEXT,
    st.sampled_from([*CLASSES, "tabby", "tabby cat", "n02123045", "[/x]"]),
)


@FAST
@given(TARGET_TEXT)
@example("²")
@example("-²")
@example("٣")
@example("-0")
def test_target_text_resolves_or_raises_convlens_error(text: str) -> None:
    from convlens.models.classes import ClassList
    from convlens.targets import resolve_targets, target_from_text

    classes = ClassList(("cat", "dog", "tabby, tabby cat"), ("n01", "n02", "n02123045"))
    logits = torch.zeros(2, 3)
    try:
        index = classes.index(target_from_text(text))
    except ConvlensError:
        pass
    else:
        assert 0 <= index < 3
    for names in (classes, None):  # with a class list, and for a model without one
        try:
            t = resolve_targets(text, logits, classes=names)
        except ConvlensError:
            continue
        assert t.shape == (2, 1) and int(t.min()) >= 0 and int(t.max()) < 3


@functools.cache
def _tiny_model():
    import convlens
    from convlens.models.classes import ClassList

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    return convlens.wrap_model(net.eval(), classes=ClassList(CLASSES))


_LAYER_TEXT = st.one_of(
    TEXT,
    st.builds(
        lambda name, sep, call: f"{name}{sep}{call}",
        st.sampled_from(["0", "1", "2", "3", "6", "", "x"]),
        st.sampled_from(["@", "@@", "", "."]),
        st.one_of(st.integers(-(10**20), 10**20).map(str), NUMERIC_TEXT),
    ),
)


@settings(FAST, max_examples=100)
@given(_LAYER_TEXT)
@example("2@²")
@example("2@99")
@example("3@-1")
@example("@0")
def test_layer_text_resolves_or_raises_convlens_error(text: str) -> None:
    import convlens
    from convlens.architecture import LayerRef, parse_layer

    try:
        ref = parse_layer(text)
    except ConvlensError:
        return
    assert isinstance(ref, LayerRef)
    model = _tiny_model()
    x = torch.rand(1, 3, 12, 12)
    try:
        result = convlens.GradCAM()(model, x, layer=text)
    except ConvlensError:
        return
    assert result.maps.shape == (1, 1, 12, 12)


_CLASS_FILE_TEXT = st.lists(
    st.one_of(
        TEXT,
        st.sampled_from(["index\tsynset\tname", "index,synset,name", "name", "0\tn01\tcat", "x"]),
        st.builds(
            lambda parts: "\t".join(parts), st.lists(st.text(max_size=5), min_size=1, max_size=4)
        ),
    ),
    max_size=5,
).map("\n".join)


@FAST
@given(_CLASS_FILE_TEXT)
@example("index\tsynset\tname\nx\tn01\tcat\n")
@example("index\tsynset\tname\n0\tn01\n")
@example("index\tname\n0\tcat\n1\n")
@example("index\tsynset\tname\n")
def test_class_list_text_parses_or_raises_convlens_error(text: str) -> None:
    from convlens.models.classes import ClassList

    try:
        classes = ClassList.from_text(text)
    except ConvlensError:
        return
    assert len(classes) >= 1 and all(isinstance(n, str) for n in classes.names)
