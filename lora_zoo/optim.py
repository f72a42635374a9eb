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

Decay toward the initial value (``build_optimizer(..., decay_to_init=True)``,
off by default). AdamW's decoupled decay ``θ ← θ − lr·wd·θ`` pulls every tensor
toward 0. For a residual-initialised method (``W ← W − ΔW(θ₀)``: NoRA, PiSSA,
AIRA) θ = 0 is not "no change": the decay alone moves the model away from the
pretrained function. With the option, the tensors that have a θ₀ snapshot
(``AdapterLinear.has_residual``) go to groups of their own with AdamW's decay
off, and a step pre-hook applies ``θ ← θ − lr·wd·(θ − θ₀)`` with the group's
current lr and wd — the same decoupled step, before the Adam update as in
AdamW, centred on θ₀. Tensors without a snapshot are untouched by the option.
The drift it removes, measured with every gradient zero (NoRA defaults on one
768×768 layer, AdamW lr 1e-3, wd 1e-2, 8000 steps), ``‖ΔW(θ) − ΔW(θ₀)‖ / ‖W‖``:
4.1 % with a constant lr and 2.1 % with the cosine schedule to 1e-6 on a random
``nn.Linear`` weight, 10.1 % and 5.3 % on a weight with singular values ∝ i^(−1/2)
(ΔW(θ₀) itself shrinks by 14.8 % and 7.7 %); exactly 0 with the option.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .adapter import adapter_modules, adapter_setup
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
    return get_method(adapter_setup(model).method).optimizer


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, optimizer: Optional[str] = None,
                 **options) -> list[dict]:
    """AdamW parameter groups for the adapted ``model`` from builder ``optimizer`` (default: the method's)."""
    spec = get_optimizer(optimizer or model_optimizer_name(model))
    groups = [g for g in spec.build_groups(model, lr, weight_decay, spec.options(options)) if g["params"]]
    if not groups:
        raise ValueError(f"optimizer {spec.name} found no trainable adapter tensors in the model")
    return groups


def initial_value_sources(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``id(tensor) → (adapter, name of its θ₀ buffer)`` for every adapter tensor with a θ₀ snapshot."""
    sources = {}
    for adapter in adapter_modules(model).values():
        if adapter.has_residual:
            for name, tensor in adapter.trainable_tensors().items():
                sources[id(tensor)] = (adapter, name + "_init")
    return sources


def split_toward_init(groups: list[dict], sources: Mapping[int, Any]) -> list[dict]:
    """Each group's tensors with a θ₀ snapshot moved to a copy of the group whose decay goes toward θ₀."""
    split = []
    for group in groups:
        anchored = [p for p in group["params"] if id(p) in sources]
        if not anchored or group["weight_decay"] == 0:
            split.append(group)
            continue
        rest = [p for p in group["params"] if id(p) not in sources]
        if rest:
            split.append({**group, "params": rest})
        split.append({**group, "name": f"{group.get('name', '?')}, decay toward init", "params": anchored,
                      "weight_decay": 0.0, "decay_to_init": group["weight_decay"]})
    return split


def decay_toward_init_hook(sources: Mapping[int, tuple[nn.Module, str]]):
    """Optimizer step pre-hook: ``θ ← θ − lr·wd·(θ − θ₀)`` for groups with ``decay_to_init = wd``."""

    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            rate = group["lr"] * group.get("decay_to_init", 0.0)
            if not rate:
                continue
            for param in group["params"]:
                if param.grad is not None:  # AdamW leaves tensors without a gradient alone
                    adapter, buffer = sources[id(param)]
                    param.lerp_(getattr(adapter, buffer), rate)

    return hook


def build_optimizer(model: nn.Module, lr: float, *, weight_decay: float, betas: Sequence[float],
                    optimizer: Optional[str] = None, decay_to_init: bool = False, **options) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, ...)``; each group is logged (name, tensors, scalars, lr).

    ``weight_decay`` and ``betas`` have their defaults in one place, ``config.TrainConfig``. ``decay_to_init``:
    decay tensors that have a θ₀ snapshot toward θ₀ instead of 0 (module docstring). On CUDA the fused
    kernel steps every tensor in one launch (the same update; the step's host work off the GPU's path).
    """
    groups = param_groups(model, lr, weight_decay, optimizer, **options)
    sources = initial_value_sources(model) if decay_to_init else {}
    if sources:
        groups = split_toward_init(groups, sources)
    for group in groups:
        logger.info("optimizer group %s: %d tensors, %d parameters, lr %.3g, weight decay %.3g%s",
                    group.get("name", "?"), len(group["params"]), sum(p.numel() for p in group["params"]),
                    group["lr"], group.get("decay_to_init", group["weight_decay"]),
                    " toward init" if "decay_to_init" in group else "")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    adamw = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)
    if any("decay_to_init" in g for g in groups):
        adamw.register_step_pre_hook(decay_toward_init_hook(sources))
    return adamw
