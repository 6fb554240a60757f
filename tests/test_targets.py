"""Targets by index, name, synset, per image, top-k; errors with close matches."""

from __future__ import annotations

import pytest
import torch

from convlens import ClassList, TargetError, wrap_model
from convlens.models import imagenet_classes
from convlens.targets import resolve_targets

CLASSES = ClassList(
    ("tabby, tabby cat", "coffee mug", "space shuttle"), ("n02123045", "n03063599", "n04266014")
)
LOGITS = torch.tensor([[0.1, 2.0, 0.5], [3.0, 0.2, 1.0]])


def test_default_is_top1_and_top_k() -> None:
    assert resolve_targets(None, LOGITS).tolist() == [[1], [0]]
    assert resolve_targets(None, LOGITS, top_k=2).tolist() == [[1, 2], [0, 2]]


@pytest.mark.parametrize("spec", [0, "0", "tabby", "Tabby Cat", "tabby, tabby cat", "n02123045"])
def test_one_target_for_all(spec: int | str) -> None:
    assert resolve_targets(spec, LOGITS, classes=CLASSES).tolist() == [[0], [0]]


def test_per_image_and_nested_targets() -> None:
    assert resolve_targets(["coffee mug", 2], LOGITS, classes=CLASSES).tolist() == [[1], [2]]
    nested = resolve_targets([[0, "space shuttle"], [1, 0]], LOGITS, classes=CLASSES)
    assert nested.tolist() == [[0, 2], [1, 0]]
    assert resolve_targets(torch.tensor([2, 1]), LOGITS).tolist() == [[2], [1]]


def test_errors() -> None:
    with pytest.raises(TargetError, match="out of range"):
        resolve_targets(3, LOGITS, classes=CLASSES)
    with pytest.raises(TargetError, match="out of range"):
        resolve_targets(torch.tensor([0, 7]), LOGITS)
    with pytest.raises(TargetError, match="coffee mug"):
        resolve_targets("cofee mug", LOGITS, classes=CLASSES)
    with pytest.raises(TargetError, match="one per image"):
        resolve_targets([0, 1, 2], LOGITS)
    with pytest.raises(TargetError, match="class list"):
        resolve_targets("cat", LOGITS)
    with pytest.raises(TargetError, match="either"):
        resolve_targets(0, LOGITS, top_k=2)
    with pytest.raises(TargetError):
        resolve_targets(None, LOGITS, top_k=4)


def test_imagenet_class_list() -> None:
    cl = imagenet_classes()
    assert len(cl) == 1000
    assert cl.index("tabby cat") == 281 == cl.index("n02123045") == cl.index("tabby")
    assert cl.index("coffee mug") == 504
    with pytest.raises(TargetError, match="tabby"):
        cl.index("taby cat")


def test_targets_by_name_through_a_method(gap_net: torch.nn.Module) -> None:
    from tests.helpers.models import images

    names = ClassList(tuple(f"thing {i}" for i in range(5)))
    model = wrap_model(gap_net, classes=names)
    exp = model_exp = __import__("convlens").GradCAM()(model, images(2), target="thing 3")
    assert exp.targets.tolist() == [[3], [3]]
    assert model_exp.class_names == [["thing 3"], ["thing 3"]]
    assert exp.top_names is not None and len(exp.top_names[0]) == 5


def test_class_list_files(tmp_path) -> None:
    plain = tmp_path / "labels.txt"
    plain.write_text("cat\ndog\n\nbird\n")
    assert ClassList.from_file(plain).names == ("cat", "dog", "bird")
    tsv = tmp_path / "classes.tsv"
    tsv.write_text("index\tsynset\tname\n1\tn2\tdog\n0\tn1\tcat\n")
    cl = ClassList.from_file(tsv)
    assert cl.names == ("cat", "dog") and cl.index("n2") == 1
    with pytest.raises(TargetError):
        ClassList.from_file(tmp_path / "missing.txt")
