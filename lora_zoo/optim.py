"""Optimizer builders: how the adapter tensors of a model are grouped for AdamW.

The protocol's optimizer is AdamW (METHODS.md, "Experiment protocol"). Methods
that change only the optimization, not what a layer computes, are *builders*
of AdamW parameter groups registered here by name (peft's ``optimizers/``;
nanoGPT's ``configure_optimizers``), so they combine with any layer method:

- ``adamw``: one group of every trainable adapter tensor (the default);
- ``loraplus`` (``loraplus.py``): output-side factors at ``lr_ratio · lr``;
- ``lorafa`` (``lorafa.py``): input-side factors frozen, the rest trained.

A builder is ``fn(model, lr, weight_decay, options) -> list of param groups``
registered with ``@register_optimizer(name, options_class)``; its options are a
dataclass (``options_class``), so they are typed, validated and shown by
``main.py --help`` like every other setting. ``build_optimizer`` picks the
method's registered builder unless another is named.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .naming import named_trainable_parameters
from .options import from_mapping
from .registry import discover, get_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build_groups: Callable
    options_class: Optional[type] = None

    def options(self, values: Optional[Mapping[str, Any]] = None):
        values = dict(values or {})
        if self.options_class is None:
            if values:
                raise ValueError(f"optimizer {self.name} takes no options, got {', '.join(sorted(values))}")
            return None
        return from_mapping(self.options_class, values, f"optimizer {self.name}")


_OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(name: str, options_class: Optional[type] = None):
    """Decorator registering a parameter-group builder ``fn(model, lr, weight_decay, options)``."""

    def decorator(fn):
        _OPTIMIZERS[name] = OptimizerSpec(name, fn, options_class)
        return fn

    return decorator


def list_optimizers() -> list[str]:
    discover()
    return sorted(_OPTIMIZERS)


def get_optimizer(name: str) -> OptimizerSpec:
    discover()
    try:
        return _OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(list_optimizers())}") from None


@register_optimizer("adamw")
def single_group(model: nn.Module, lr: float, weight_decay: float, options=None) -> list[dict]:
    """Every trainable adapter tensor in one group at ``lr``."""
    return [{"name": "adapters", "params": list(named_trainable_parameters(model).values()), "lr": lr,
             "weight_decay": weight_decay}]


def model_optimizer_name(model: nn.Module) -> str:
    """The optimizer builder the model's method is registered with."""
    setup = getattr(model, "lora_zoo_setup", None)
    if setup is None:
        raise ValueError("model has no adapters from apply_adapters")
    return get_method(setup.method).optimizer


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, optimizer: Optional[str] = None,
                 **options) -> list[dict]:
    """AdamW parameter groups for the adapted ``model`` from builder ``optimizer`` (default: the method's)."""
    spec = get_optimizer(optimizer or model_optimizer_name(model))
    groups = [g for g in spec.build_groups(model, lr, weight_decay, spec.options(options)) if g["params"]]
    if not groups:
        raise ValueError(f"optimizer {spec.name} found no trainable adapter tensors in the model")
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-2, betas: Sequence[float] = (0.9, 0.999),
                    optimizer: Optional[str] = None, **options) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, ...)``; each group is logged (name, tensors, scalars, lr)."""
    groups = param_groups(model, lr, weight_decay, optimizer, **options)
    for group in groups:
        logger.info("optimizer group %s: %d tensors, %d parameters, lr %.3g, weight decay %.3g",
                    group.get("name", "?"), len(group["params"]), sum(p.numel() for p in group["params"]),
                    group["lr"], group["weight_decay"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
