"""Text the user controls: printed as written, read from regular UTF-8 files, parsed row by row."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.progress import Progress
from rich.table import Table
from torch import nn

from convlens import ClassList, ImageError, InputError, ModelLoadError, TargetError, wrap_model
from convlens.console import SafeConsole, description_column, one_line, printable
from convlens.data import read_labelled
from convlens.images import load_image
from convlens.models import ConvlensModel, Preprocess, load_model
from convlens.userfiles import read_user_text, require_file

MARKUP = ["[/x]", "[/]", "[bold]name", ":cat: food", "a [red]b[/red] c"]


def three_outputs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


# ------------------------------------------------------------------------------ the console


def rendered(*objects: object) -> str:
    buffer = io.StringIO()
    console = SafeConsole(file=buffer, width=200)
    console.print(*objects)
    return buffer.getvalue()


@pytest.mark.parametrize("text", MARKUP)
def test_markup_and_emoji_codes_print_as_written(text: str) -> None:
    assert rendered(text).rstrip("\n") == text
    table = Table(title=text)
    table.add_column(text)
    table.add_row(text)
    assert rendered(table).count(text) == 3  # title, header and cell


@pytest.mark.parametrize("text", MARKUP)
def test_progress_descriptions_print_as_written(text: str) -> None:
    buffer = io.StringIO()
    console = SafeConsole(file=buffer, width=200)
    with Progress(description_column(), console=console) as bar:
        bar.add_task(text, total=1)
    assert text in buffer.getvalue()


def test_printable_escapes_control_characters_and_undecodable_bytes() -> None:
    name = os.fsdecode(b"bad\xff.png")
    assert printable(name) == "bad\\xff.png"
    assert printable("a\x1b[31mb\x07") == "a\\x1b[31mb\\x07"
    assert printable("two\nlines\tkept") == "two\nlines\tkept"
    assert one_line("two\nlines\r\tand\x85") == "two\\nlines\\r\\tand\\x85"
    assert printable("café ☕ 猫") == "café ☕ 猫"  # printable text is left alone
    # The escaped text can be written to a strict ASCII or UTF-8 stream.
    printable(name + "\x1b").encode("ascii")


def test_a_surrogate_in_a_printed_string_does_not_fail_a_strict_stream() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    console = SafeConsole(file=stream, width=200)
    console.print(os.fsdecode(b"bad\xff.png"))
    stream.flush()
    assert b"bad\\xff.png" in raw.getvalue()


@pytest.mark.parametrize("name", ["a$x^$b", "$\\frac{$", "dog $5 and $6", "[/x]"])
def test_plot_labels_draw_as_written(name: str) -> None:
    from matplotlib import cbook
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from convlens.render import short_name

    label = short_name(name)
    assert not cbook.is_math_text(label) and label.replace(r"\$", "$") == name  # drawn as is
    fig = Figure()
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, label)
    fig.canvas.draw()  # "$\frac{$" read as math would raise here


# ------------------------------------------------------------------------- reading user files


def test_utf8_with_and_without_a_bom(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_bytes("café\nthé\n".encode())
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + "café\nthé\n".encode())
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(b"\xff\xfe" + "café\nthé\n".encode("utf-16-le"))
    for f in (plain, bom, utf16):
        assert read_user_text(f, "class list") == "café\nthé\n"
        assert ClassList.from_file(f).names == ("café", "thé")


def test_text_that_is_not_utf8_names_file_line_and_offset(tmp_path: Path) -> None:
    latin1 = tmp_path / "labels.txt"
    latin1.write_bytes("cat\ncafé\n".encode("latin-1"))
    with pytest.raises(TargetError, match=r"labels\.txt.*byte 0xe9 at offset 7, line 2.*UTF-8"):
        ClassList.from_file(latin1)
    binary = tmp_path / "labels.bin"
    binary.write_bytes(b"cat\x00\x00\x01")
    with pytest.raises(TargetError, match="binary"):
        ClassList.from_file(binary)


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="is a directory"):
        ClassList.from_file(tmp_path)
    with pytest.raises(TargetError, match="not found"):
        ClassList.from_file(tmp_path / "missing.txt")
    if Path("/dev/zero").exists():  # a device would never end
        with pytest.raises(InputError, match="character device"):
            read_user_text("/dev/zero", "CSV file")
        with pytest.raises(ImageError, match="character device"):
            load_image("/dev/zero")


FIFO_SCRIPT = """
import os, sys
from pathlib import Path
from convlens import ClassList, ImageError, InputError, ModelLoadError, TargetError
from convlens.data import read_labelled
from convlens.images import load_image
from convlens.models.user import load_user_network
from convlens.userfiles import _read_regular

d = Path(sys.argv[1])
for f in ("pipe", "pipe.csv", "pipe.pt", "pipe.py"):
    os.mkfifo(d / f)
checks = [
    (lambda: ClassList.from_file(d / "pipe"), TargetError),
    (lambda: read_labelled(d / "pipe.csv", ClassList(("a",))), InputError),
    (lambda: load_image(d / "pipe"), ImageError),
    (lambda: load_user_network(str(d / "pipe.pt")), ModelLoadError),
    (lambda: load_user_network(str(d / "pipe.py") + ":build"), ModelLoadError),
    # the opener itself, should a FIFO appear after the check: opened without blocking
    (lambda: _read_regular(d / "pipe", "class list", InputError), InputError),
]
for call, error in checks:
    try:
        call()
    except error as exc:
        assert "named pipe" in str(exc), exc
    else:
        raise AssertionError("no error")
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # In a subprocess with a timeout: a regression fails the test instead of hanging it.
    proc = subprocess.run(
        [sys.executable, "-c", FIFO_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_weights_must_be_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n"
    )
    (tmp_path / "w.pt").mkdir()
    with pytest.raises(ModelLoadError, match=r"weights file .* is a directory"):
        load_model(f"{tmp_path / 'net.py'}:build", weights=tmp_path / "w.pt")


# ------------------------------------------------------------------------------ class lists


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("index\tsynset\tname\n0\tn1\n", "line 2: 2 field"),
        ("index\tname\n0\tcat\n1\tdog\textra\n", "line 3: 3 field"),
        ("index\tname\n\n0\tcat\n1\t\n", "line 4: the name is empty"),
        ("index,name\n0,cat\none,dog\n", "line 3: index 'one' is not a whole number"),
        ("index,name\n1,cat\n2,dog\n", "indices must be 0 ... 1"),
        ("index,name\n0,cat\n0,dog\n", "indices must be 0 ... 1"),
        ("index,name\n", "header but no classes"),
    ],
)
def test_malformed_class_tables_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "classes.tsv"
    path.write_text(text)
    with pytest.raises(TargetError, match=r"classes\.tsv") as info:
        ClassList.from_file(path)
    assert message in str(info.value)


def test_class_tables_in_any_row_order_and_with_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "classes.csv"
    path.write_text("index,synset,name\n\n1,n2,dog\n0,n1,cat\n\n")
    classes = ClassList.from_file(path)
    assert classes.names == ("cat", "dog") and classes.synsets == ("n1", "n2")
    assert classes.source == str(path)


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c", "d")])
def test_a_class_list_must_name_every_output(tmp_path: Path, names: tuple[str, ...]) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(names) + "\n")
    pre = Preprocess(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ModelLoadError, match=rf"labels\.txt.* {len(names)} names .* 3 outputs"):
        wrap_model(three_outputs(), classes=path, preprocess=pre)
    with pytest.raises(ModelLoadError, match=rf"{len(names)} names .* 3 outputs"):
        wrap_model(three_outputs(), classes=ClassList(names), preprocess=pre)
    # A wrapper built by hand meets its class list at predict time.
    model = ConvlensModel(three_outputs(), pre, ClassList(names))
    with pytest.raises(ModelLoadError, match=rf"{len(names)} names .* 3 outputs"):
        model.predict(torch.zeros(1, 3, 8, 8))


def test_counting_outputs_leaves_the_model_as_found() -> None:
    net = three_outputs().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pre = Preprocess(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = wrap_model(net, classes=ClassList(("a", "b", "c")), preprocess=pre)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert model.classes.names == ("a", "b", "c")


def test_a_builtin_model_checks_a_given_class_list(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n")
    with pytest.raises(ModelLoadError, match=r"labels\.txt.* 2 names .* 1000 outputs"):
        load_model("lite0", classes=path)


# --------------------------------------------------------------------------- labelled CSVs


def csv_file(tmp_path: Path, text: str) -> Path:
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    path = tmp_path / "set.csv"
    path.write_text(text)
    return path


CLASSES = ClassList(("cat", "dog"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,label\na.png\n", "line 2: 1 field(s) where the header has 2"),
        ("path,label\n\na.png,cat,dog\n", "line 3: 3 fields where the header has 2"),
        ("path,label\n ,cat\n", "line 2: the path cell is empty"),
        ('path,label\na.png,cat\n"b\n.png",cow\n', "line 3: unknown class name 'cow'"),
        ("path,label\n\n\n", "has no rows"),
        ("image,label\na.png,cat\n", "needs a 'path' (or 'file') column"),
        ("path,label\na.png," + "x" * 200_000 + "\n", "line 2: not a valid CSV row"),
    ],
)
def test_malformed_csv_rows_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = csv_file(tmp_path, text)
    with pytest.raises(InputError, match=r"set\.csv") as info:
        read_labelled(path, CLASSES)
    assert message in str(info.value)


def test_csv_blank_lines_trailing_commas_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "")
    path.write_bytes(b"\xef\xbb\xbf Path , Label \r\n\r\na.png,dog,,\r\n,,\r\nb.png,\r\n")
    assert read_labelled(path, CLASSES) == [(tmp_path / "a.png", 1), (tmp_path / "b.png", None)]


def test_csv_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "")
    path.write_bytes("path,label\na.png,cat\nb\xe9.png,dog\n".encode("cp1252"))
    with pytest.raises(InputError, match=r"set\.csv.*byte 0xe9 at offset 22, line 3"):
        read_labelled(path, CLASSES)


def test_require_file_returns_the_path(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_text("x")
    link = tmp_path / "link.txt"
    link.symlink_to(f)
    assert require_file(link, "class list") == link
    with pytest.raises(InputError, match="not a valid path"):
        require_file("bad\x00name", "class list")
