"""Putting adapters into models: ``wrap_linear`` for any ``nn.Linear``, ``apply_adapters`` for any model.

On an open_clip CLIP model ``apply_adapters`` splits attention (once, ``attention.split_attention``)
and finds the target linears by short names (``targets.find_target_linears``); on any other
``nn.Module`` (a transformers ``LlamaForCausalLM``) targets are module-name patterns
(``targets.match_modules``: ``q_proj,k_proj,v_proj,up_proj,down_proj``, or globs), and it freezes the whole
model, lets the method plan per-layer options from a global view (AIRA's rank
allocation) and replaces each target by its adapter. The method's options are
split between its layer config (saved with the adapters; rebuilds them) and its
training schedule's options (AdaLoRA's budget schedule; used by the loop only).
What is trained, counted and saved is decided by one naming rule (``naming.py``).
``check_fits`` refuses options a target layer's shape cannot hold (a rank above
min(d_in, d_out), ...) from the shapes alone, before any work; ``apply_adapters``
runs it first too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional, Union

from torch import nn

from .adapter import AdapterConfig, AdapterLinear, adapter_modules
from .attached import MethodSetup
from .attention import split_attention
from .catalog import get_method
from .registry import MethodSpec
from .targets import (check_patterns, check_targets, find_target_linears, is_open_clip, match_modules, module_shapes,
                      target_shapes)

AdapterSetup = MethodSetup  # what apply_adapters records (the name of lora_zoo 0.3)


def method_options(method: str, options: Mapping[str, Any]) -> tuple[MethodSpec, Any, Any]:
    """``(spec, module config, hooks options)`` for ``method`` from one mapping of its options.

    Every option is type-checked here, so bad options fail before any model is touched.
    """
    spec = get_method(method)
    module_values, hooks_values = spec.split_options(options)
    config = spec.config_class.from_dict(module_values)
    hooks_options = None
    if spec.hooks is not None and spec.hooks.options_class is not None:
        hooks_options = spec.hooks.options_class(**hooks_values)
        spec.hooks.check_options(config, hooks_options)
    return spec, config, hooks_options


def _check_shapes(layer_class: type, config: AdapterConfig, shapes: Mapping[str, tuple[int, int]]) -> None:
    """``layer_class.check_fits`` on each distinct shape, the error naming the first layer of that shape."""
    checked = set()
    for name, shape in shapes.items():
        if shape not in checked:
            checked.add(shape)
            try:
                layer_class.check_fits(config, *shape)
            except ValueError as err:
                raise ValueError(f"{err} ({name})") from None


def check_fits(model_or_layers: Union[nn.Module, Mapping[str, Any]], method: str,
               encoders: Iterable[str] = ("vision", "text"), targets: Iterable[str] = ("q", "k", "v"),
               layers: Optional[Iterable[int]] = None, **options) -> None:
    """A one-line error when ``method`` with ``options`` asks a target layer for more than its shape allows (a rank
    above min(d_in, d_out), ...), from the shapes alone: nothing is built or changed.

    ``model_or_layers``: an open_clip model, whose targets ``encoders``/``targets``/``layers`` choose (its
    attention split or not), any other model whose modules ``targets`` patterns name, or
    ``{name: nn.Linear or (d_out, d_in)}``. The check is each layer class's ``check_fits``; its constructor runs
    the same check again.
    """
    spec, config, _ = method_options(method, options)
    weight_method(spec)
    if isinstance(model_or_layers, Mapping):
        shapes = {name: (layer.out_features, layer.in_features) if isinstance(layer, nn.Module) else tuple(layer)
                  for name, layer in model_or_layers.items()}
    elif is_open_clip(model_or_layers):
        shapes = target_shapes(model_or_layers, encoders, targets, layers)
    else:
        shapes = module_shapes(model_or_layers, _module_targets(targets, layers))
    _check_shapes(spec.layer_class, config, shapes)


def build_config(method: str, **options) -> AdapterConfig:
    """The layer config of ``method`` from keyword options (unknown or mistyped option → one-line error)."""
    return method_options(method, options)[1]


def weight_method(spec: MethodSpec) -> MethodSpec:
    """``spec``, or a one-line error when its method is not a weight update of linear layers."""
    if not issubclass(spec.layer_class, AdapterLinear):
        raise ValueError(f"{spec.name} is a {spec.kind} method, not a weight adapter of linear layers: apply it with "
                         "lora_zoo.apply_method")
    return spec


def wrap_linear(linear: nn.Linear, method: str, stats=None, **cfg) -> AdapterLinear:
    """An adapter of ``method`` around any ``nn.Linear`` (frozen), built from its layer options."""
    spec = weight_method(get_method(method))
    return spec.layer_class(linear, spec.config_class.from_dict(cfg), stats).train(linear.training)


def _module_targets(targets, layers) -> tuple[str, ...]:
    """The target patterns of a model that is not open_clip's (``layers`` chooses open_clip blocks only)."""
    if layers is not None:
        raise ValueError("layers= chooses blocks of an open_clip model's towers; on other models name the modules "
                         "with target patterns (globs such as model.layers.1*.self_attn.q_proj)")
    return check_patterns(targets)


def apply_adapters(model: nn.Module, method: str, encoders: Iterable[str] = ("vision", "text"),
                   targets: Iterable[str] = ("q", "k", "v"), layers: Optional[Iterable[int]] = None,
                   stats: Optional[Mapping[str, Any]] = None,
                   layer_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None, **options) -> dict[str, AdapterLinear]:
    """Inject ``method`` adapters into a model in place; returns ``{layer name: adapter}``.

    On an open_clip CLIP model ``encoders``, ``targets`` (short names: q, k, v, o, fc1, fc2) and ``layers`` choose
    the layers; on any other model ``targets`` are module-name patterns (``targets.match_modules``) and
    ``encoders`` is not used (recorded as ``()``). ``options`` are the method's options (layer and schedule alike). ``stats`` are calibration
    statistics from ``collect_activation_stats`` (needed by methods that use activations).
    ``layer_overrides`` fixes per-layer options (e.g. ``{"name": {"rank": 4}}``) instead of letting the
    method plan them; checkpoints use it to rebuild an allocation.
    """
    spec, config, schedule_options = method_options(method, options)
    cls = weight_method(spec).layer_class
    clip = is_open_clip(model)
    if clip:
        encoders, targets = check_targets(encoders, targets)
        layers = tuple(int(i) for i in layers) if layers is not None else None
    else:
        encoders, targets = (), _module_targets(targets, layers)
    if adapter_modules(model):
        raise ValueError("model already has adapters; apply_adapters expects a model without them")
    if layer_overrides is None:  # planned options are fitted by the plan; given ones are checked per layer
        _check_shapes(cls, config, target_shapes(model, encoders, targets, layers) if clip
                      else module_shapes(model, targets))
    if clip:
        split_attention(model, encoders)
    linears = find_target_linears(model, encoders, targets, layers) if clip else match_modules(model, targets)
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
    model.lora_zoo_setup = MethodSetup(
        method, spec.layer, config.to_dict(), encoders, targets, layers, {k: dict(v) for k, v in overrides.items()},
        dataclasses.asdict(schedule_options) if schedule_options is not None else {}, kind=spec.kind, spec=spec)
    return adapters


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
