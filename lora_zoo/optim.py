"""Optimizer builders: how the trainable tensors of a model are grouped, and which algorithm steps them.

The protocol's optimizer is AdamW (METHODS.md, "Experiment protocol"). Methods
that change only the optimization, not what a layer computes, are *builders*
of parameter groups registered by name (peft's ``optimizers/``; nanoGPT's
``configure_optimizers``), so they combine with any method:

- ``adamw``: one group of every trainable tensor, AdamW (the default);
- ``sgd``, ``adam``: the same group stepped by SGD with momentum (Dassl's trainer: the prompt
  learners' recipe) or Adam (TaskRes);
- ``loraplus`` (``loraplus.py``): output-side factors at ``lr_ratio · lr``;
- ``lorafa`` (``lorafa.py``): input-side factors frozen, the rest trained.

A builder is ``fn(model, lr, weight_decay, options) -> list of param groups``
registered with ``@register_optimizer(name, options_class, algorithm)``; its options are a
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
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .adapter import adapter_modules
from .attached import method_setup
from .naming import named_trainable_parameters
from .options import Options, option
from .registry import OptimizerSpec, lookup_method, lookup_optimizer, register_optimizer

logger = logging.getLogger(__name__)


@dataclass
class AdamOptions(Options):
    eps: float = option(1e-8, "Adam's epsilon (Tip-Adapter-F: 1e-4)")


@dataclass
class SgdOptions(Options):
    momentum: float = option(0.9, "SGD momentum (Dassl's default, the prompt learners' trainer)")


def _adam(kind):
    return lambda groups, lr, betas, weight_decay, options, fused: kind(
        groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=getattr(options, "eps", 1e-8), fused=fused)


#: how an optimizer builder's groups are stepped (``OptimizerSpec.algorithm``); betas apply to the Adams only
ALGORITHMS = {
    "adamw": _adam(torch.optim.AdamW),
    "adam": _adam(torch.optim.Adam),
    "sgd": lambda groups, lr, betas, weight_decay, options, fused: torch.optim.SGD(
        groups, lr=lr, momentum=options.momentum, weight_decay=weight_decay, fused=fused),
}


def single_group(model: nn.Module, lr: float, weight_decay: float, options=None) -> list[dict]:
    """Every trainable tensor of the method in one group at ``lr``."""
    return [{"name": "adapters", "params": list(named_trainable_parameters(model).values()), "lr": lr,
             "weight_decay": weight_decay}]


register_optimizer("adamw", AdamOptions)(single_group)
register_optimizer("adam", AdamOptions, algorithm="adam")(single_group)
register_optimizer("sgd", SgdOptions, algorithm="sgd")(single_group)


def get_optimizer(name: str) -> OptimizerSpec:
    """The registered optimizer builder ``name`` (``catalog.get_optimizer`` imports every method module first)."""
    return lookup_optimizer(name)


def model_optimizer_name(model: nn.Module) -> str:
    """The optimizer builder the model's method is registered with."""
    return lookup_method(method_setup(model).method).optimizer


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, optimizer: Optional[str] = None,
                 **options) -> list[dict]:
    """Parameter groups for the adapted ``model`` from builder ``optimizer`` (default: the method's)."""
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
                    optimizer: Optional[str] = None, decay_to_init: bool = False, **options) -> torch.optim.Optimizer:
    """The builder's algorithm (AdamW unless it says otherwise: SGD, Adam) over ``param_groups(model, ...)``;
    each group is logged (name, tensors, scalars, lr).

    ``weight_decay`` and ``betas`` have their defaults in one place, ``config.TrainConfig``. ``decay_to_init``:
    decay tensors that have a θ₀ snapshot toward θ₀ instead of 0 (module docstring). On CUDA the fused
    kernel steps every tensor in one launch (the same update; the step's host work off the GPU's path).
    """
    spec = get_optimizer(optimizer or model_optimizer_name(model))
    groups = param_groups(model, lr, weight_decay, spec.name, **options)
    sources = initial_value_sources(model) if decay_to_init else {}
    if sources:
        groups = split_toward_init(groups, sources)
    for group in groups:
        logger.info("optimizer group %s: %d tensors, %d parameters, lr %.3g, weight decay %.3g%s",
                    group.get("name", "?"), len(group["params"]), sum(p.numel() for p in group["params"]),
                    group["lr"], group.get("decay_to_init", group["weight_decay"]),
                    " toward init" if "decay_to_init" in group else "")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    stepper = ALGORITHMS[spec.algorithm](groups, lr, betas, weight_decay, spec.options(options), fused or None)
    if any("decay_to_init" in g for g in groups):
        stepper.register_step_pre_hook(decay_toward_init_hook(sources))
    return stepper
