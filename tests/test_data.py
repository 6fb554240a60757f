"""Labelled image sets from class folders and CSV files."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from convlens import ClassList, InputError
from convlens.data import read_labelled

CLASSES = ClassList(
    ("tabby", "coffee mug", "space shuttle"), ("n02123045", "n03063599", "n04266014")
)


def img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), "white").save(path)
    return path


def test_class_folders_by_name_and_synset(tmp_path: Path) -> None:
    a = img(tmp_path / "coffee_mug" / "a.png")
    b = img(tmp_path / "n04266014" / "b.jpg")
    loose = img(tmp_path / "loose.png")
    items = read_labelled(tmp_path, CLASSES)
    assert items == [(a, 1), (b, 2), (loose, None)]
    assert read_labelled(tmp_path, CLASSES, limit=1) == [(a, 1)]


def test_csv_with_labels_by_index_name_and_synset(tmp_path: Path) -> None:
    a = img(tmp_path / "x" / "a.png")
    b = img(tmp_path / "b.png")
    (tmp_path / "set.csv").write_text(
        f"path,label\nx/a.png,tabby\n{b},n03063599\nc.png,2\nd.png,\n"
    )
    items = read_labelled(tmp_path / "set.csv", CLASSES)
    assert items == [(a, 0), (b, 1), (tmp_path / "c.png", 2), (tmp_path / "d.png", None)]


def test_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("image,label\na.png,0\n")
    with pytest.raises(InputError, match="path"):
        read_labelled(tmp_path / "bad.csv", CLASSES)
    (tmp_path / "worse.csv").write_text("path,label\na.png,cofee mug\n")
    with pytest.raises(InputError, match=r"line 2.*coffee mug"):
        read_labelled(tmp_path / "worse.csv", CLASSES)
    img(tmp_path / "tree" / "giraffe" / "g.png")
    with pytest.raises(InputError, match="giraffe"):
        read_labelled(tmp_path / "tree", CLASSES)


def test_unlabelled_folder(tmp_path: Path) -> None:
    a = img(tmp_path / "a.png")
    assert read_labelled(a, CLASSES) == [(a, None)]
