"""The helpers shared by the benchmark scripts (``benchmarks/_common.py``).

``benchmarks/`` is not a package (its scripts import ``_common`` from their own folder), so the
module is loaded here from its path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convlens_benchmarks_common", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load()

TITLE = "# Results"
INTRO = "Produced by a script. One section per run.\n"
FILE = (
    "# Results\n"
    "\n"
    "Produced by a script. One section per run.\n"
    "\n"
    "## 2026-01-01 UTC, cpu (x86_64)\n"
    "\n"
    "- old run\n"
    "\n"
    "### Table\n"
    "\n"
    "| a |\n"
    "|---|\n"
    "\n"
    "## Peers, 2026-01-01 UTC, cpu\n"
    "\n"
    "- peers\n"
    "\n"
    "## 2026-01-02 UTC, cuda (H100)\n"
    "\n"
    "- gpu run\n"
)


def test_write_section_replaces_in_place_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text(FILE, encoding="utf-8")
    new = "## Peers, 2026-01-01 UTC, cpu\n\n- peers, rerun\n"
    common.write_section(out, "## Peers, 2026-01-01 UTC, cpu", new, title="# other", intro="x")
    assert out.read_text(encoding="utf-8") == FILE.replace("- peers\n", "- peers, rerun\n")


def test_write_section_is_a_fixed_point_of_a_tidy_file(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text(FILE, encoding="utf-8")
    first = "## " + FILE.split("\n## ")[1]
    common.write_section(out, first.splitlines()[0], first, title=TITLE)
    assert out.read_text(encoding="utf-8") == FILE


def test_write_section_appends_a_new_heading(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text(FILE, encoding="utf-8")
    heading = "## 2026-01-03 UTC, cpu (x86_64), 1 torch thread"
    common.write_section(out, heading, f"{heading}\n\n- new run\n\n\n", title=TITLE, intro=INTRO)
    assert out.read_text(encoding="utf-8") == FILE + f"\n{heading}\n\n- new run\n"


def test_write_section_matches_the_whole_heading_and_drops_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text(
        "# R\n\n## a\n\nfirst\n\n## a, b\n\nlonger heading\n\n## a  \n\nduplicate\n",
        encoding="utf-8",
    )
    common.write_section(out, "## a", "## a\n\nnew\n", title=TITLE)
    assert out.read_text(encoding="utf-8") == "# R\n\n## a\n\nnew\n\n## a, b\n\nlonger heading\n"


def test_write_section_creates_the_file_with_its_head(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "RESULTS.md"
    common.write_section(out, "## x", "## x\n\nbody\n", title=TITLE, intro=INTRO)
    assert out.read_text(encoding="utf-8") == f"{TITLE}\n\n{INTRO}\n## x\n\nbody\n"
    bare = tmp_path / "bare.md"
    common.write_section(bare, "## x", "## x\n\nbody\n", title=TITLE)
    assert bare.read_text(encoding="utf-8") == f"{TITLE}\n\n## x\n\nbody\n"


def test_write_section_gives_a_headless_file_its_head(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("\n\n## x\n\nold\n", encoding="utf-8")
    common.write_section(out, "## y", "## y\n\nnew\n", title=TITLE)
    assert out.read_text(encoding="utf-8") == f"{TITLE}\n\n## x\n\nold\n\n## y\n\nnew\n"


@pytest.mark.parametrize(("plural_one", "word"), [(False, "thread"), (True, "threads")])
def test_section_heading_on_cpu(
    monkeypatch: pytest.MonkeyPatch, plural_one: bool, word: str
) -> None:
    monkeypatch.setattr(common, "processor", lambda: "x86_64")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    cpu = torch.device("cpu")
    got = common.section_heading("2026-01-01", cpu, plural_one=plural_one)
    assert got == f"## 2026-01-01 UTC, cpu (x86_64), 1 torch {word}"
    labelled = common.section_heading("2026-01-01", cpu, label="feature browser", threads=False)
    assert labelled == "## 2026-01-01 UTC, feature browser, cpu (x86_64)"


def test_command_line_quotes_the_arguments() -> None:
    line = common.command_line(["--classes", "golden retriever"], script="benchmarks/b.py")
    assert line == "python benchmarks/b.py --classes 'golden retriever'"
    assert common.command_line([], script="benchmarks/b.py") == "python benchmarks/b.py"


def test_find_data_takes_the_first_folder_with_labels(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (a, b, c):
        folder.mkdir()
    (b / "labels.csv").write_text("file,label\n", encoding="utf-8")
    (c / "labels.csv").write_text("file,label\n", encoding="utf-8")
    assert common.find_data((a, b, c)) == b
    assert common.find_data((a,)) is None
