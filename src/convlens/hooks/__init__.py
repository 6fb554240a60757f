"""Everything convlens does to a model for one call, and undoes afterwards, by job:

- :mod:`convlens.hooks.capture`: forward hooks that capture a layer's output
  (:func:`layer_capture`, :func:`capture_call`, which can end the forward pass at the layer);
- :mod:`convlens.hooks.state`: the model's training flags and gradients (:func:`model_state`)
  and full-float32 GPU convolutions (:func:`full_float32`);
- :mod:`convlens.hooks.rules`: backward rules for ReLU-like units (:func:`backprop_rule`);
- :mod:`convlens.hooks.ops`: the table of torch functions the torch-function modes recognise.
- :mod:`convlens.hooks.attention`: explicit attention matrices of vision transformers, also
  where the model runs fused attention (:func:`explicit_attention`).

All context managers register on entry and remove in ``finally`` (also when registration fails
halfway), and restore what they change. Gradients are taken with ``torch.autograd.grad`` on
captured tensors, never with module backward hooks, so in-place activations and modules called
several times in one forward work.
"""

from __future__ import annotations

from convlens.hooks.attention import AttentionRecord, explicit_attention
from convlens.hooks.capture import (
    CallCapture,
    LayerCapture,
    StopForward,
    call_error,
    capture_call,
    hooks,
    layer_capture,
    named_module,
    stoppable,
)
from convlens.hooks.rules import RULES, BackpropRuleMode, backprop_rule
from convlens.hooks.state import (
    check_autograd_available,
    full_float32,
    model_state,
    tf32_convolutions,
)

__all__ = [
    "RULES",
    "AttentionRecord",
    "BackpropRuleMode",
    "CallCapture",
    "LayerCapture",
    "StopForward",
    "backprop_rule",
    "call_error",
    "capture_call",
    "check_autograd_available",
    "explicit_attention",
    "full_float32",
    "hooks",
    "layer_capture",
    "model_state",
    "named_module",
    "stoppable",
    "tf32_convolutions",
]
