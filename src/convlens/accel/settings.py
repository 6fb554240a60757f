"""The one acceleration setting a caller owns: which speed-ups a method call may use.

Every field switches one accelerator that changes only the order of floating-point operations
(or nothing at all), never the quantity computed: the accelerated result equals the plain one
to float tolerance, which ``tests/accel/test_settings.py`` checks for every registered method
and every field. :class:`Acceleration` is immutable and holds no state; the decision to
compile is a pure function of the setting, the device and the job's size
(:meth:`Acceleration.compiles`), never of what ran earlier in the process.

Where a setting comes from, first match wins: the ``accel=`` argument of a method call (or of
:func:`convlens.explain`), the model wrapper's :attr:`convlens.models.ConvlensModel.accel`, the
default ``Acceleration()``. ``Acceleration.plain()`` is the plain PyTorch path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch

from convlens.accel.threads import ThreadGovernor, governed_threads
from convlens.errors import InputError

__all__ = ["AUTO_COMPILE_PASSES", "Acceleration", "compiler_available"]

AUTO_COMPILE_PASSES = 8192
"""``compile="auto"`` compiles a job that runs at least this many images (or occluded copies)
through the network: forward passes x batch, known before the job starts. Compilation costs
several seconds up to half a minute on a CPU (``benchmarks/RESULTS_METRICS.md``), so it pays
only for long jobs."""


def compiler_available() -> bool:
    """Whether TorchInductor can build CPU kernels here: a C++ compiler on ``PATH`` (``$CXX``,
    ``g++``, ``c++`` or ``clang++``)."""
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return any(shutil.which(n) for n in names if n)


@dataclass(frozen=True)
class Acceleration:
    """Which accelerators a method call may use; ``Acceleration()`` (all on) is the default,
    :meth:`plain` turns every one off.

    Attributes:
        fold_batchnorm: run a copy of the network with eval-mode BatchNorm folded into the
            convolutions that feed it (:mod:`convlens.accel.folded`:
            ``W' = s W``, ``b' = s (b - mu) + beta``, ``s = gamma / sqrt(var + eps)``).
        lean_graph: build input-gradient graphs that keep one byte per ReLU activation and no
            convolution inputs (:mod:`convlens.accel.lean_graph`) where a method's plain graph
            would be large (saliency above ``PLAIN_GRAPH_BYTES``; the network's own pass when no
            folded copy is used).
        channels_last: feed passes in ``channels_last`` (NHWC) layout; ``None``: on CPUs only,
            where oneDNN convolves NHWC faster.
        compile: ``torch.compile`` the fully computed part of long no-grad jobs
            (:mod:`convlens.accel.compiled`): ``True``, ``False`` or ``"auto"``
            (:meth:`compiles`).
        incremental: occlusion (``mode="auto"``) recomputes only the boxes an occluding patch
            changes (Krypton, Nakandala et al. 2019; :mod:`convlens.accel.incremental`)
            instead of full forward passes of every occluded copy.
        threads: torch intra-op threads for the call (``torch.set_num_threads``, restored
            afterwards): ``"auto"`` uses the cores other processes leave free, up to the
            process's own setting, re-counted between the chunks of long jobs
            (:mod:`convlens.accel.threads`); a number fixes the count; ``None`` leaves the
            process's setting.

    Raises:
        InputError: (a ``ValueError``) ``compile`` is not ``True``, ``False`` or ``"auto"``,
            or ``threads`` is not a positive integer, ``"auto"`` or ``None``.
    """

    fold_batchnorm: bool = True
    lean_graph: bool = True
    channels_last: bool | None = None
    compile: bool | Literal["auto"] = "auto"
    incremental: bool = True
    threads: int | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        if self.compile not in (True, False, "auto"):
            raise InputError(f"compile must be True, False or 'auto', not {self.compile!r}")
        if self.threads not in (None, "auto") and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise InputError(
                f"threads must be a positive integer, 'auto' or None, not {self.threads!r}"
            )

    @classmethod
    def plain(cls) -> Acceleration:
        """Every accelerator off: the methods' plain PyTorch path."""
        return cls(
            fold_batchnorm=False,
            lean_graph=False,
            channels_last=False,
            compile=False,
            incremental=False,
            threads=None,
        )

    @property
    def is_plain(self) -> bool:
        """Whether every accelerator is off."""
        return self == Acceleration.plain()

    def but(self, **changes: object) -> Acceleration:
        """A copy with ``changes`` applied (``accel.but(compile=False)``)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def uses_channels_last(self, device: torch.device) -> bool:
        """Whether passes on ``device`` run in ``channels_last`` layout."""
        if self.channels_last is None:
            return device.type == "cpu"
        return self.channels_last

    def compiles(self, device: torch.device, passes: int) -> bool:
        """Whether a no-grad job of ``passes`` images (forward passes x batch) on ``device``
        is compiled: ``compile=True`` always, ``False`` never; ``"auto"`` on a CPU with a C++
        compiler when ``passes >= AUTO_COMPILE_PASSES`` (GPUs only with ``compile=True``). The
        answer depends on these arguments alone."""
        if self.compile is True:
            return True
        if self.compile is False or device.type != "cpu" or passes < AUTO_COMPILE_PASSES:
            return False
        return compiler_available()

    @contextlib.contextmanager
    def threads_for_call(
        self, device: torch.device | None = None
    ) -> Iterator[ThreadGovernor | None]:
        """The call's torch threads, restored on exit. With ``threads="auto"`` yields the
        :class:`~convlens.accel.threads.ThreadGovernor` whose ``check()`` long jobs call between
        chunks; otherwise ``None`` (a fixed count is set for the block; ``None`` changes
        nothing). ``"auto"`` changes nothing for a call on another ``device`` than the CPU or
        with ``torch.use_deterministic_algorithms(True)``."""
        if self.threads is None:
            yield None
            return
        if self.threads == "auto":
            if (
                device is not None and device.type != "cpu"
            ) or torch.are_deterministic_algorithms_enabled():
                yield None
                return
            with governed_threads() as governor:
                yield governor
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield None
        finally:
            torch.set_num_threads(before)
