"""What the ``convlens`` commands share: option types, option groups, option parsing, model
loading, output.

Each option that several commands take is declared here once, with its help text, as an
``Annotated`` type; a command lists it in its signature with its own default, e.g.
``batch_size: BatchSizeOpt = 8``. Options that always go together form a group: a frozen
dataclass whose fields are such types (:class:`ModelOptions`), which a command takes as one
argument through :func:`option_group`; its ``--help`` lists the group's options one by one.
The command modules (:mod:`convlens.cli.explain`, :mod:`convlens.cli.features`,
:mod:`convlens.cli.analyze`, :mod:`convlens.cli.evaluate`, :mod:`convlens.cli.synthesis`)
import from here and not from each other. Typer reads the option types from the commands'
annotations at run time, so a command module must import every type it names in a signature
(not only under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar, get_type_hints

import typer
from rich.progress import Progress
from rich.text import Text

from convlens.console import SafeConsole, one_line
from convlens.console import progress_bar as console_progress_bar
from convlens.errors import InputError
from convlens.validate import finite_floats, non_negative_int, positive_int
from convlens.validate import parse_device as _parse_device

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch

    from convlens.models import ConvlensModel, Preprocess

__all__ = [
    "BatchSizeOpt",
    "ClassesOpt",
    "DeviceOpt",
    "ImagesArg",
    "LabelledDataArg",
    "LimitOpt",
    "MeanOpt",
    "MethodsOpt",
    "ModelOpt",
    "ModelOptions",
    "OutDirOpt",
    "PlainOpt",
    "RandomWeightsOpt",
    "ResizeOpt",
    "SizeOpt",
    "StdOpt",
    "WeightsOpt",
    "WorkersOpt",
    "checked",
    "err",
    "fail",
    "load_net",
    "option_group",
    "out",
    "parse_device",
    "parse_methods",
    "parse_triple",
    "progress_bar",
    "say",
    "show_warning",
    "status",
]

# Both consoles print user text as written: no markup, emoji codes or highlighting unless a call
# asks for them (see convlens.console). Never format user text into a markup string.
out = SafeConsole()
"""Results (tables, summaries) go to stdout."""
err = SafeConsole(stderr=True)
"""Progress, status and error messages go to stderr."""


def say(message: str, *, console: SafeConsole | None = None) -> None:
    """Print a one-line message (``wrote 4 images to out/``) as plain text, unwrapped.

    Args:
        message: the text; markup in it is printed as written and control characters escaped.
        console: where to print; default :data:`err` (stderr).
    """
    (console or err).print(Text(one_line(message)), soft_wrap=True)


def fail(message: str) -> None:
    """Print ``error: message`` on one line of stderr (the ``error:`` prefix in red).

    Args:
        message: the error's text; newlines and control characters in it are escaped, so the
            report stays one line whatever the user's input held.
    """
    err.print(Text.assemble(("error:", "red"), " ", one_line(message)), soft_wrap=True)


def status(message: str) -> AbstractContextManager[object]:
    """A spinner with ``message`` (plain text) on stderr for the ``with`` block."""
    return err.status(Text(one_line(message)))


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show a warning as one ``warning: ...`` line on stderr, without the source line (the
    command line's ``warnings.showwarning``)."""
    err.print(Text.assemble(("warning:", "yellow"), " ", one_line(str(message))), soft_wrap=True)


def checked(check: Callable[[Any, str], object]) -> Callable[..., Any]:
    """An option callback that checks the value as it is parsed, with a function of
    :mod:`convlens.validate` (the one the Python API uses), so that a bad number fails before
    any work with one ``error:`` line naming the option (its first name), e.g.
    ``typer.Option(callback=checked(positive_int))``. ``None`` (not given) passes."""

    def callback(param: typer.CallbackParam, value: Any) -> Any:
        if value is not None:
            check(value, param.opts[0])
        return value

    return callback


# ---------------------------------------------------------------------------------- the model

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="lite0 (default), lite1, lite2, timm:NAME, torchvision:NAME, hf:FOLDER "
        "(pip install convlens[zoo]), path/to/net.py:factory, pkg.module:factory, "
        "or a TorchScript file.",
    ),
]
WeightsOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        help="State-dict (.pt/.pth) or .safetensors file for a factory or zoo model "
        "(zoo models otherwise read the library's local cache; nothing is downloaded)."
    ),
]
RandomWeightsOpt = Annotated[
    bool,
    typer.Option(
        "--random-weights",
        help="Build a zoo model with random weights, to try the plumbing without weights "
        "(its maps mean nothing).",
    ),
]
ClassesOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(help="Class names: one per line, or a TSV with index, synset, name."),
]
SizeOpt = Annotated[Optional[int], typer.Option(help="Input size (centre crop).")]  # noqa: UP045
ResizeOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="Shorter side before cropping (default size/0.875)."),
]
MeanOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Normalisation mean, e.g. 0.485,0.456,0.406."),
]
StdOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(help="Normalisation std, e.g. 0.229,0.224,0.225."),
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="cpu, cuda, cuda:1 ... or auto.", callback=checked(_parse_device)),
]
PlainOpt = Annotated[
    bool,
    typer.Option(
        "--plain",
        help="Run every method's plain PyTorch path: no folded copies, lean graphs, "
        "compilation or incremental occlusion (results equal to float tolerance; see "
        "convlens.accel).",
    ),
]


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model options of a command, as one argument: ``--model``, ``--weights``,
    ``--random-weights``, ``--classes``, ``--size``, ``--resize``, ``--mean``, ``--std``,
    ``--device`` and ``--plain`` (see :func:`load_net` for their meaning). A command takes them with
    ``@option_group(ModelOptions, only=...)`` and a parameter annotated ``ModelOptions``; a
    field the command does not offer keeps its default here."""

    model: ModelOpt = "lite0"
    weights: WeightsOpt = None
    random_weights: RandomWeightsOpt = False
    classes: ClassesOpt = None
    size: SizeOpt = None
    resize: ResizeOpt = None
    mean: MeanOpt = None
    std: StdOpt = None
    device: DeviceOpt = "cpu"
    plain: PlainOpt = False

    def load(self) -> ConvlensModel:
        """The model these options describe (:func:`load_net`, with a status line meanwhile).

        Raises:
            InputError: a malformed mean, std, size or device.
            ConvlensError: the model, weights or classes cannot be loaded.
        """
        return load_net(
            self.model,
            self.weights,
            self.classes,
            self.size,
            self.resize,
            self.mean,
            self.std,
            self.device,
            plain=self.plain,
            random_weights=self.random_weights,
        )


LOADING = (
    "model",
    "weights",
    "random_weights",
    "classes",
    "size",
    "resize",
    "mean",
    "std",
    "device",
)
"""The :class:`ModelOptions` of a command that loads a model but runs no explanation method
(all but ``--plain``)."""

_F = TypeVar("_F", bound=Callable[..., Any])


def option_group(
    group: type,
    *,
    only: Collection[str] | None = None,
    types: Mapping[str, Any] | None = None,
) -> Callable[[_F], _F]:
    """Decorate a command so that it takes the options of ``group`` (a dataclass whose fields
    are ``Annotated`` option types with defaults, such as :class:`ModelOptions`) as one
    argument: the parameter annotated ``group``.

    The decorated command's signature (which typer reads) lists the group's fields in that
    parameter's place, each as the option its field declares; a call gathers them into one
    ``group`` instance. All parameters become keyword-only (typer passes them by name).

    Args:
        group: the dataclass.
        only: the fields the command offers (default all); the others keep their defaults.
        types: another option type for some fields, for a command where the option means
            something else (``{"model": ModelArg}`` makes ``--model`` an argument).

    Raises:
        ValueError: ``only`` or ``types`` names no field, the command has no parameter
            annotated ``group``, or another of its parameters has a field's name (programming
            errors, raised at import).
    """
    hints = get_type_hints(group, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(group)}
    names = [n for n in fields if only is None or n in only]
    unknown = {*(only or ()), *(types or {})} - fields.keys()
    if unknown:
        raise ValueError(f"{group.__name__} has no field {', '.join(sorted(unknown))}")
    options = [
        inspect.Parameter(
            n,
            inspect.Parameter.KEYWORD_ONLY,
            default=fields[n].default,
            annotation=(types or {}).get(n, hints[n]),
        )
        for n in names
    ]

    def decorate(command: _F) -> _F:
        signature = inspect.signature(command, eval_str=True)
        slot = next((p for p in signature.parameters.values() if p.annotation is group), None)
        if slot is None:
            raise ValueError(f"{command.__name__} has no parameter of type {group.__name__}")
        clash = signature.parameters.keys() & set(names)
        if clash:
            raise ValueError(f"{command.__name__} has parameters named {sorted(clash)}")
        params: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            params += options if p is slot else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return command(**kwargs, **{slot.name: group(**values)})

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        if signature.return_annotation is not inspect.Signature.empty:
            run.__annotations__["return"] = signature.return_annotation
        return run  # type: ignore[return-value]

    return decorate


# ------------------------------------------------------------------------- inputs and outputs

ImagesArg = Annotated[list[str], typer.Argument(help="Image files or folders.")]
LabelledDataArg = Annotated[str, typer.Argument(help="Image folder (class subfolders) or CSV.")]
LimitOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="At most N images.", callback=checked(positive_int)),
]
OutDirOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
MethodsOpt = Annotated[
    str, typer.Option(help="Comma-separated method names (see `convlens methods`).")
]
BatchSizeOpt = Annotated[
    int, typer.Option(help="Images per batch.", callback=checked(positive_int))
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        help="Processes reading images (0: none).",
        callback=checked(non_negative_int),
    ),
]


# ------------------------------------------------------------------------------------ parsing


def parse_triple(
    text: str | None, what: str, *, positive: bool = False
) -> tuple[float, float, float] | None:
    """``"0.5"`` or ``"0.485,0.456,0.406"`` as three finite numbers (each above 0 with
    ``positive``); ``None`` stays ``None``.

    Raises:
        InputError: not one or three such numbers (the message names the option ``--what``).
    """
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--{what} must be three numbers like 0.5,0.5,0.5, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise InputError(f"--{what} must have 1 or 3 values, got {text!r}")
    return finite_floats(values, f"--{what}", positive=positive)  # type: ignore[return-value]


def parse_device(name: str) -> torch.device:
    """The ``--device`` value as a device; ``auto`` picks CUDA when there is one (see
    :func:`convlens.validate.parse_device`).

    Raises:
        InputError: not a device name, or a device this machine lacks.
    """
    return _parse_device(name, "--device")


def parse_methods(text: str) -> list[str]:
    """The ``--methods`` value as a list of registered method names.

    Raises:
        InputError: the list is empty.
        ConvlensError: a name is not registered (the message lists close matches).
    """
    from convlens.methods import METHODS
    from convlens.methods.registry import get_method

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise InputError(f"--methods needs at least one of: {', '.join(METHODS)}")
    for n in names:
        get_method(n)  # raises with close matches
    return names


# -------------------------------------------------------------------------------- the helpers


def load_net(
    model: str,
    weights: Path | None = None,
    classes: Path | None = None,
    size: int | None = None,
    resize: int | None = None,
    mean: str | None = None,
    std: str | None = None,
    device: str = "cpu",
    *,
    plain: bool = False,
    random_weights: bool = False,
) -> ConvlensModel:
    """Load the model the model options describe, showing a status line on stderr meanwhile.

    Without ``size``, ``resize``, ``mean`` and ``std`` the model keeps its own preprocessing;
    with any of them, the others default to the built-in models' (mean and std 0.5) or
    ImageNet's, with a crop of ``size`` and a resize of ``size / 0.875``; for a zoo model
    (``timm:``, ``torchvision:``, ``hf:``) they default to the model's own, its interpolation
    kept.

    Args:
        model: the ``--model`` specification (see :data:`ModelOpt`).
        weights: state-dict or safetensors file for a factory or zoo model.
        classes: class-name file.
        size: input size (centre crop).
        resize: shorter side before cropping.
        mean: normalisation mean as text (see :func:`parse_triple`).
        std: normalisation std as text.
        device: the ``--device`` value (see :func:`parse_device`).
        plain: the ``--plain`` flag: the model's ``accel`` becomes
            ``Acceleration.plain()`` (every method call on it runs the plain path).
        random_weights: the ``--random-weights`` flag (zoo models only; see
            :func:`convlens.models.load_model`).

    Returns:
        The loaded model.

    Raises:
        InputError: a malformed mean, std or device.
        ConvlensError: the model, weights or classes cannot be loaded.
    """
    from convlens.models import BUILTIN_MODELS, Preprocess, load_model
    from convlens.models.zoo import is_zoo_spec

    pre = None
    m, s = parse_triple(mean, "mean"), parse_triple(std, "std", positive=True)
    dev = parse_device(device)
    if size is not None:
        positive_int(size, "--size")
    if resize is not None:
        positive_int(resize, "--resize")
    given = any(v is not None for v in (size, resize, m, s))
    zoo = is_zoo_spec(model)
    if given and not zoo:
        base = (
            Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3)
            if model in BUILTIN_MODELS
            else Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        )
        pre = _preprocess_with(base, size, resize, m, s)
    with status(f"loading model {model} ..."):
        net = load_model(
            model,
            weights=weights,
            classes=classes,
            preprocess=pre,
            device=dev,
            random_weights=random_weights,
        )
        if given and zoo:
            from convlens.models.base import count_outputs

            net.preprocess = _preprocess_with(net.preprocess, size, resize, m, s)
            count_outputs(net.net, net.preprocess.crop)  # fails in one line at a size it refuses
    if plain:
        from convlens.accel import Acceleration

        net.accel = Acceleration.plain()
    return net


def _preprocess_with(
    base: Preprocess,
    size: int | None,
    resize: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> Preprocess:
    """``base`` with the preprocessing options given (a new ``size`` resizes to ``size / 0.875``
    unless ``resize`` is given)."""
    crop = size or base.crop
    return dataclasses.replace(
        base,
        resize=resize or (round(crop / 0.875) if size else base.resize),
        crop=crop,
        mean=mean or base.mean,
        std=std or base.std,
    )


def progress_bar() -> Progress:
    """A progress display on stderr (:func:`convlens.console.progress_bar`), cleared when the
    command fails so that its ``error:`` line stands alone."""
    return console_progress_bar(console=err)
