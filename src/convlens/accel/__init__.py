"""Everything that makes a method faster but not different, behind one setting the caller owns.

Methods hold their math in plain PyTorch; the accelerators here are switched by one immutable
:class:`Acceleration` (``ConvlensModel.accel``, or ``accel=`` on a method call or
:func:`convlens.explain`; ``Acceleration.plain()`` turns every one off). Each equals the plain
path to float tolerance (``tests/accel/test_settings.py``).

Modules, one accelerator each:

- :mod:`~convlens.accel.settings`: :class:`Acceleration` and the deterministic compile rule;
- :mod:`~convlens.accel.folded`: BatchNorm-folded, ``channels_last`` copies of a network;
- :mod:`~convlens.accel.lean_graph`: lean autograd graphs for input gradients;
- :mod:`~convlens.accel.compiled`: ``torch.compile`` of fixed-batch no-grad forwards;
- :mod:`~convlens.accel.fingerprint`: the key of the per-network caches;
- :mod:`~convlens.accel.allocator`: glibc allocator thresholds (process-wide, CLI only);
- :mod:`~convlens.accel.threads`: torch threads per call that follow the cores other processes
  leave free (``Acceleration.threads="auto"``).

- :mod:`~convlens.accel.incremental`: incremental (Krypton-style) occlusion, its engine and
  its fused, compiled suffix (``Acceleration.incremental`` switches it).

The per-network caches (folded copies, compiled forwards) are keyed on the network (weakly:
they go away with it), a fingerprint of its parameters and buffers, and the settings used;
:func:`clear_caches` empties them.
"""

from __future__ import annotations

from convlens.accel.compiled import clear_compiled
from convlens.accel.folded import clear_inference_copies
from convlens.accel.settings import AUTO_COMPILE_PASSES, Acceleration, compiler_available

__all__ = ["AUTO_COMPILE_PASSES", "Acceleration", "clear_caches", "compiler_available"]


def clear_caches() -> None:
    """Forget every kept folded copy and compiled forward of every network (and the compiled
    forwards' build counts), e.g. to free the memory of their second set of weights."""
    clear_inference_copies()
    clear_compiled()
