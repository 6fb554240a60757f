"""Incremental occlusion (Krypton: Nakandala, Kumar & Papakonstantinou, SIGMOD 2019,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations").

Occlusion's math (the drop of the target's score when a patch is covered, averaged over the
windows covering each pixel) lives in :class:`convlens.methods.perturbation.Occlusion`; this
package only evaluates the model on occluded copies faster, equal to full forward passes up to
floating-point rounding (with ``tau``, Krypton's projective-field cap, approximately). Modules,
by job:

- :mod:`~convlens.accel.incremental.trace`: tracing with :mod:`torch.fx` and the clean pass
  (every node's output kept: the "materialised views");
- :mod:`~convlens.accel.incremental.regions`: the changed box of each feature map;
- :mod:`~convlens.accel.incremental.ops`: which operations have a rule (element-wise, sliding
  window, padding, sums and concatenations);
- :mod:`~convlens.accel.incremental.plan`: one :class:`StepKind` per node;
- :mod:`~convlens.accel.incremental.engine`: running the plan on batches of (image, window)
  pairs;
- :mod:`~convlens.accel.incremental.suffix`: the fully computed end of the network, fused.
"""

from convlens.accel.incremental.engine import IncrementalEngine
from convlens.accel.incremental.plan import Step, StepKind
from convlens.accel.incremental.regions import Box, window_box
from convlens.accel.incremental.suffix import Suffix, build_suffix
from convlens.accel.incremental.trace import NotIncrementalError

__all__ = [
    "Box",
    "IncrementalEngine",
    "NotIncrementalError",
    "Step",
    "StepKind",
    "Suffix",
    "build_suffix",
    "window_box",
]
