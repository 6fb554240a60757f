"""Listing a network's layers with their output shapes, and finding a layer by name.

:func:`layer_table` runs one forward pass with a forward hook on every submodule and records
what each one returned; :func:`format_layer_table` renders that as the text table printed by
``convlens layers``; :func:`resolve_layer` turns a dotted name such as
``"_blocks.15._project_conv"`` into the submodule, with suggestions when the name is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.errors import LayerError
from convlens.hooks.capture import named_module
from convlens.tokens import channel_count, detect_layout, patch_grid, stated_prefix

__all__ = ["LayerInfo", "format_layer_table", "layer_table", "resolve_layer"]

_MAX_SHAPES_SHOWN = 3


@dataclass(frozen=True)
class LayerInfo:
    """One submodule of a network, as seen during one forward pass.

    Attributes:
        name: dotted name from ``named_modules()`` (``"features.0"``); the root is not listed.
        type: class name of the module (``"Conv2d"``).
        depth: nesting level: 1 for children of the root, 2 for their children, and so on.
        shapes: shape of each tensor the module returned, in call order: one entry per call for
            modules returning a tensor (a module called twice, like a shared activation, has
            two); each tensor of a tuple, list or dict output counts; non-tensor outputs are
            skipped. Empty when the module was not called.
        params: number of parameters in the module's whole subtree (its own and its
            descendants', each shared parameter counted once).
        calls: how many times the module ran during the forward pass.
        layout: for a layer whose (last) output is a transformer's token sequence or a
            channels-last map, how it maps to a feature map
            (:meth:`convlens.tokens.TokenLayout.describe`: ``"tokens 197x192 -> 14x14 grid + 1
            prefix"``); ``None`` for a (B, C, H, W) map or any other output.
    """

    name: str
    type: str
    depth: int
    shapes: tuple[tuple[int, ...], ...]
    params: int
    calls: int
    layout: str | None = None


def layer_table(net: nn.Module, x: torch.Tensor) -> list[LayerInfo]:
    """Describe every submodule of ``net`` by running it once on ``x``.

    The forward pass runs under ``torch.no_grad()`` in eval mode, with a forward hook on every
    submodule. Hooks are registered all or nothing and removed afterwards; each module's
    ``training`` flag is restored, also when the forward pass raises. Submodules inside a
    TorchScript submodule cannot be hooked and are listed with no shapes and zero calls.

    Args:
        net: the network.
        x: an input batch, e.g. ``torch.zeros(1, 3, 224, 224)``; moved to the device of the
            network's first parameter.

    Returns:
        One :class:`LayerInfo` per submodule, in ``named_modules()`` order (the root excluded;
        a module registered under two names is listed once, under the first).

    Raises:
        LayerError: ``net`` itself is a TorchScript module (it cannot be hooked).
    """
    if isinstance(net, torch.jit.ScriptModule):
        raise LayerError(
            "TorchScript models cannot be hooked, so their layers cannot be inspected; "
            "load the model from its Python code instead (--model net.py:build --weights w.pt)"
        )
    named = [(name, module) for name, module in net.named_modules() if name]
    scripted: set[int] = set()
    for _, module in named:
        if isinstance(module, torch.jit.ScriptModule):
            scripted.update(id(m) for m in module.modules())
    shapes: dict[int, list[tuple[int, ...]]] = {id(m): [] for _, m in named}
    calls: dict[int, int] = dict.fromkeys(shapes, 0)

    last: dict[int, tuple[int, ...]] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        calls[id(module)] += 1
        shapes[id(module)].extend(_tensor_shapes(output))
        if isinstance(output, torch.Tensor):
            last[id(module)] = tuple(output.shape)

    hooked = [m for _, m in named if id(m) not in scripted]
    device = next((p.device for p in net.parameters()), x.device)
    with _training_flags(net), _forward_hooks(hooked, record), torch.no_grad():
        net.eval()
        net(x.to(device))

    layouts = _layouts(net, x.to(device), named, last)
    return [
        LayerInfo(
            name=name,
            type=type(module).__name__,
            depth=name.count(".") + 1,
            shapes=tuple(shapes[id(module)]),
            params=sum(p.numel() for p in module.parameters()),
            calls=calls[id(module)],
            layout=layouts.get(id(module)),
        )
        for name, module in named
    ]


def _layouts(
    net: nn.Module,
    x: torch.Tensor,
    named: Sequence[tuple[str, nn.Module]],
    last: Mapping[int, tuple[int, ...]],
) -> dict[int, str]:
    """Descriptions of the token and channels-last layouts among the modules' last outputs
    (:mod:`convlens.tokens`); the patch grid is observed only when a token sequence is seen."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    batch = int(x.shape[0])
    found: dict[int, str] = {}
    base: tuple[int, int] | None = None
    looked = False
    for name, module in named:
        shape = last.get(id(module))
        if shape is None or len(shape) not in (3, 4) or shape[0] != batch:
            continue
        if len(shape) == 3 and not looked:
            looked = True
            try:
                base = patch_grid(net, x)
            except LayerError:
                base = None
        try:
            layout = detect_layout(
                shape,
                size,
                base_grid=base,
                channels=channel_count(module) if len(shape) == 4 else None,
                prefix=stated_prefix(net),
                name=name,
            )
        except LayerError:
            continue
        if layout.kind != "nchw" and layout.grid[0] * layout.grid[1] > 1:
            found[id(module)] = layout.describe(shape)
    return found


def format_layer_table(rows: Sequence[LayerInfo]) -> str:
    """Render :func:`layer_table` rows as an indented text table.

    Columns: layer name (indented two spaces per level below the first), type, output shape
    (``1x32x112x112``; several distinct shapes are listed, the first few only, and modules called
    more than once say ``×N calls``; ``-`` for a module that did not run) and parameter count
    of the subtree.

    Args:
        rows: rows from :func:`layer_table`.

    Returns:
        The table as lines joined by newlines, without a trailing newline.
    """
    header = ("Layer", "Type", "Output shape", "Params")
    if not rows:
        return "(the model has no submodules)"
    body = [
        (
            "  " * max(0, row.depth - 1) + row.name,
            row.type,
            _shape_cell(row),
            f"{row.params:,}",
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

    def line(cells: tuple[str, str, str, str]) -> str:
        left = "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths[:3], strict=True))
        return f"{left}  {cells[3].rjust(widths[3])}".rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def resolve_layer(net: nn.Module, name: str) -> nn.Module:
    """Return the submodule of ``net`` with the dotted ``name``.

    Args:
        net: the network.
        name: a name as listed by :func:`layer_table`, e.g. ``"_blocks.15._project_conv"`` or
            ``"features.3"``.

    Returns:
        The submodule.

    Raises:
        LayerError: no submodule has that name (the message suggests close names), or the name
            is empty or names a parameter or buffer.
    """
    return named_module(net, name)


def _tensor_shapes(output: Any) -> Iterator[tuple[int, ...]]:
    """Shapes of the tensors in a module's output: itself, or the items of a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        yield tuple(output.shape)
        return
    items: Iterable[Any] = ()
    if isinstance(output, (tuple, list)):
        items = output
    elif isinstance(output, Mapping):
        items = output.values()
    for item in items:
        if isinstance(item, torch.Tensor):
            yield tuple(item.shape)


def _shape_cell(row: LayerInfo) -> str:
    if row.calls == 0:
        return "-"
    distinct = list(dict.fromkeys(row.shapes))
    text = ", ".join("x".join(map(str, s)) for s in distinct[:_MAX_SHAPES_SHOWN])
    if len(distinct) > _MAX_SHAPES_SHOWN:
        text += f", … +{len(distinct) - _MAX_SHAPES_SHOWN} more"
    if not text:
        text = "(no tensor)"
    if row.calls > 1:
        text += f" (×{row.calls} calls)"
    if row.layout:
        text += f" [{row.layout}]"
    return text


@contextmanager
def _forward_hooks(modules: Iterable[nn.Module], hook: Any) -> Iterator[None]:
    """Register ``hook`` as a forward hook on every module for the enclosed block.

    All or nothing: if a registration fails, the hooks already added are removed before the
    error propagates; all hooks are removed on exit, whatever happens in the block.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _training_flags(net: nn.Module) -> Iterator[None]:
    """Snapshot every module's ``training`` flag and restore it on exit."""
    flags = [(module, module.training) for module in net.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
