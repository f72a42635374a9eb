"""What a method's kind attached to a model, recorded on it as ``model.lora_zoo_setup`` (``MethodSetup``).

Every kind (``kinds.py``) records the same fields: the method as asked (a preset such as loraplus,
or a method), the registered class its modules are (``layer``), its kind, the module config (all
that rebuilds them), the training hooks' options (used by the loop only, never saved), and the
registered spec itself, so that code below the method layer (optimizer builders, hooks) reads
the method's metadata without looking a name up. Weight adapters add where they sit (encoders,
targets, block indices, per-layer options); a learner adds its own rebuild record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn


@dataclass
class MethodSetup:
    """What ``apply_adapters`` or ``kinds.apply_method`` did to a model (stored on it as ``model.lora_zoo_setup``)."""

    method: str                  # as asked (a registered method or a preset such as loraplus)
    layer: str                   # the registered class its modules are
    config: dict[str, Any]       # the module config: all that is needed to rebuild the modules
    encoders: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    layers: Optional[tuple[int, ...]] = None
    layer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    schedule_options: dict[str, Any] = field(default_factory=dict)  # the training hooks', not saved
    kind: str = "weights"
    record: dict[str, Any] = field(default_factory=dict)   # a learner's rebuild record (``Learner.record``)
    spec: Any = field(default=None, repr=False, compare=False)  # the registry.MethodSpec of ``method``


def method_setup(model: nn.Module) -> MethodSetup:
    """What a kind recorded on ``model``; a one-line error when no method was applied to it."""
    setup = getattr(model, "lora_zoo_setup", None)
    if setup is None:
        raise ValueError("model has no adapters or other method applied (lora_zoo.apply_adapters, lora_zoo.apply_method)")
    return setup
