"""Putting adapters into models: ``wrap_linear`` for any ``nn.Linear``, ``apply_adapters`` for open_clip.

``apply_adapters`` splits attention (once, ``attention.split_attention``),
finds the target linears (``targets.find_target_linears``), freezes the whole
model, lets the method plan per-layer options from a global view (AIRA's rank
allocation) and replaces each target by its adapter. What is trained, counted
and saved is decided by one naming rule (``adapter.is_adapter_tensor``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from .adapter import AdapterLinear, is_adapter_tensor
from .attention import split_attention
from .registry import get_method
from .targets import check_targets, find_target_linears


@dataclass
class AdapterSetup:
    """What ``apply_adapters`` did to a model (stored on it as ``model.lora_zoo_setup``)."""

    method: str
    config: dict[str, Any]
    encoders: tuple[str, ...]
    targets: tuple[str, ...]
    layers: Optional[tuple[int, ...]]
    layer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def build_config(method: str, **cfg):
    """The method's config dataclass from keyword options (unknown option → one-line error)."""
    return get_method(method).config_class.from_dict(cfg)


def wrap_linear(linear: nn.Linear, method: str, stats=None, **cfg) -> AdapterLinear:
    """An adapter of ``method`` around any ``nn.Linear`` (frozen), built from keyword options."""
    cls = get_method(method)
    return cls(linear, cls.config_class.from_dict(cfg), stats).train(linear.training)


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """``{qualified name: adapter}`` of every adapter inside ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def apply_adapters(model: nn.Module, method: str, encoders: Iterable[str] = ("vision", "text"),
                   targets: Iterable[str] = ("q", "k", "v"), layers: Optional[Iterable[int]] = None,
                   stats: Optional[Mapping[str, Any]] = None,
                   layer_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None, **cfg) -> dict[str, AdapterLinear]:
    """Inject ``method`` adapters into an open_clip CLIP model in place; returns ``{layer name: adapter}``.

    ``stats`` are calibration statistics from ``collect_activation_stats`` (needed by methods that use
    activations). ``layer_overrides`` fixes per-layer options (e.g. ``{"name": {"rank": 4}}``) instead of
    letting the method plan them; checkpoints use it to rebuild an allocation.
    """
    cls = get_method(method)
    config = cls.config_class.from_dict(cfg)
    encoders, targets = check_targets(encoders, targets)
    layers = tuple(int(i) for i in layers) if layers is not None else None
    if adapter_modules(model):
        raise ValueError("model already has adapters; apply_adapters expects a model without them")
    split_attention(model, encoders)
    linears = find_target_linears(model, encoders, targets, layers)
    for param in model.parameters():
        param.requires_grad_(False)
    overrides = dict(layer_overrides) if layer_overrides is not None else cls.plan_layers(linears, stats, config)
    unknown = sorted(set(overrides) - set(linears))
    if unknown:
        raise ValueError(f"layer_overrides name {unknown[0]}, which is not a target layer of this model")
    adapters = {}
    for name, linear in linears.items():
        layer_config = dataclasses.replace(config, **overrides.get(name, {}))
        layer_stats = stats.get(name) if stats is not None else None
        adapter = cls(linear, layer_config, layer_stats).train(linear.training)  # keep the model's mode
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, adapter)
        adapters[name] = adapter
    model.lora_zoo_setup = AdapterSetup(method, config.to_dict(), encoders, targets, layers,
                                        {k: dict(v) for k, v in overrides.items()})
    return adapters


def named_trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters that require grad, by qualified name (the one rule: ``lora_`` prefix)."""
    return {n: p for n, p in model.named_parameters() if is_adapter_tensor(n) and p.requires_grad}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors an optimizer should update."""
    return list(named_trainable_parameters(model).values())


def count_trainable(model: nn.Module) -> int:
    """Number of trainable adapter scalars."""
    return sum(p.numel() for p in trainable_parameters(model))


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter's ΔW into its base weight (idempotent)."""
    for adapter in adapter_modules(model).values():
        adapter.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Take every adapter's ΔW back out of its base weight."""
    for adapter in adapter_modules(model).values():
        adapter.unmerge()


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """``{layer name: rank}`` for adapters that have a ``rank`` option (AIRA's allocation, LoRA's uniform one)."""
    return {name: a.config.rank for name, a in adapter_modules(model).items() if hasattr(a.config, "rank")}


@torch.no_grad()
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every saved adapter tensor (``lora_`` parameters and persistent buffers), by qualified name."""
    return {n: t for n, t in model.state_dict().items() if is_adapter_tensor(n)}
