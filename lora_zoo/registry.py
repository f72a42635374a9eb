"""Method and optimizer registries: one decorator beside each method class, with the metadata tables and sweeps need.

    @register_method("nora", display_name="NoRA", citation="Li et al., ICCV 2025",
                     lr=1e-3)   # the protocol's learning rate, with a comment saying where it comes from
    class NoraLinear(AdapterLinear): ...

    register_preset("loraplus", layer="lora", optimizer="loraplus", display_name="LoRA+", ...)

A *method* is a registered class of one of the kinds (``kinds.py``): an ``AdapterLinear``
subclass (weights: an update of linear layers' weights), or a ``Learner`` subclass (prompts
fed to a tower, a head on frozen features, tensors of the backbone). A *preset* is a
registered method trained with another optimizer builder (LoRA+ = LoRA layers + the LoRA+
optimizer), so it stays runnable by name. Each registration carries the display name
(tables), the citation (docs, ``--help``), the protocol learning rate (the runner's
default), the optimizer builder the method trains with, its own training recipe (the loop's
settings it trains with by default, e.g. SGD with a warm-up epoch for the prompt learners),
the run settings it defaults (``run_defaults``: CLIP-SVD adapts every linear of a block), and
its training hooks (AdaLoRA's rank allocator, DyLoRA's rank sampler), if any.

This module only holds what was registered; it imports no method. ``catalog.py`` imports
every method module by a plain import (so the import contracts see them) and is where
names are looked up (``catalog.get_method``, ``catalog.list_methods``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .options import OptionError, field_names

_METHODS: dict[str, "MethodSpec"] = {}
_OPTIMIZERS: dict[str, "OptimizerSpec"] = {}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what it is built of, how it trains by default, and how it is named."""

    name: str
    layer: str            # the registered class its modules are (itself, except for a preset)
    display_name: str     # as in tables (e.g. "LoRA+")
    citation: str         # paper the method comes from
    lr: float             # the protocol's learning rate for this method (the runner's default)
    optimizer: str        # optimizer builder it trains with by default
    hooks: Optional[type] = None          # TrainingHooks subclass driving it from the loop, or None
    module_class: Optional[type] = None   # the registered class (AdapterLinear or Learner subclass); None: preset
    #: the loop's settings (``TrainConfig`` fields) its own recipe sets; a value may be a function of
    #: ``(shots, dataset)`` (CoOp's epochs per shot count)
    recipe: Mapping[str, Any] = field(default_factory=dict)
    #: a preset's own defaults of the method's options (CoOp (4): n_ctx 4 from "a photo of a"); given ones win. A
    #: value may be a function of ``(shots, dataset)``, a default a run resolves (ProGrad's λ; ``run_options``)
    options: Mapping[str, Any] = field(default_factory=dict)
    #: run settings (``ExperimentConfig`` fields made with ``config.method_default``: targets, template) the method
    #: defaults when a run leaves them null (CLIP-SVD: every linear of a block); values or functions of (shots, dataset)
    run_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layer_class(self) -> type:
        return _METHODS[self.layer].module_class

    @property
    def kind(self) -> str:
        """The kind of method (``kinds.py``): weights, prompts, head or tensors."""
        return self.layer_class.kind

    @property
    def config_class(self) -> type:
        """The config dataclass of its modules: what is saved with them and rebuilds them."""
        return self.layer_class.config_class

    @property
    def hooks_options_class(self) -> Optional[type]:
        return getattr(self.hooks, "options_class", None)

    def option_classes(self) -> list[type]:
        """Every dataclass the method's options (``method_options``) go to: module, then hooks."""
        return [c for c in (self.config_class, self.hooks_options_class) if c is not None]

    def split_options(self, options: Mapping[str, Any]) -> tuple[dict, dict]:
        """``(module options, hooks options)`` from one mapping of method options."""
        options = {**{k: v for k, v in self.options.items() if not callable(v)}, **options}
        module_names = set(field_names(self.config_class))
        hooks_names = set(field_names(self.hooks_options_class)) if self.hooks_options_class else set()
        unknown = sorted(set(options) - module_names - hooks_names)
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(unknown)} for method {self.name}; expected some of "
                              f"{', '.join(sorted(module_names | hooks_names))}")
        return ({k: v for k, v in options.items() if k in module_names},
                {k: v for k, v in options.items() if k in hooks_names})

    def run_options(self, shots: int, dataset: str) -> dict[str, Any]:
        """The defaults of the method's options that depend on the run (the functions of ``(shots, dataset)`` among
        its ``options``: ProGrad's λ at 8 and 16 shots), evaluated; a preset's over its method's."""
        options = {**(_METHODS[self.layer].options if self.layer in _METHODS else {}), **self.options}
        return {key: value(shots, dataset) for key, value in options.items() if callable(value)}

    def recipe_settings(self, shots: int, dataset: str) -> dict[str, Any]:
        """The loop's settings of the method's own recipe for a run of ``shots`` on ``dataset`` (a preset's, over its
        method's)."""
        return self._resolved("recipe", shots, dataset)

    def run_settings(self, shots: int, dataset: str) -> dict[str, Any]:
        """The run settings the method defaults (``run_defaults``) for a run of ``shots`` on ``dataset`` (a preset's,
        over its method's)."""
        return self._resolved("run_defaults", shots, dataset)

    def _resolved(self, table: str, shots: int, dataset: str) -> dict[str, Any]:
        method = getattr(_METHODS[self.layer], table) if self.layer in _METHODS else {}
        values = {**method, **getattr(self, table)}
        return {key: value(shots, dataset) if callable(value) else value for key, value in values.items()}


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer builder: ``build_groups(model, lr, weight_decay, options)`` gives the parameter groups
    that ``algorithm`` (adamw, sgd, adam; ``optim.ALGORITHMS``) steps."""

    name: str
    build_groups: Callable
    options_class: Optional[type] = None
    algorithm: str = "adamw"

    def options(self, values: Optional[Mapping[str, Any]] = None):
        from .options import from_mapping

        values = dict(values or {})
        if self.options_class is None:
            if values:
                raise ValueError(f"optimizer {self.name} takes no options, got {', '.join(sorted(values))}")
            return None
        return from_mapping(self.options_class, values, f"optimizer {self.name}")


def _same(a: Optional[type], b: Optional[type]) -> bool:
    """The same class, or the same class defined again (a module reloaded)."""
    return a is b or (a is not None and b is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))


def _add(spec: MethodSpec) -> None:
    known = _METHODS.get(spec.name)
    if known is not None and not (_same(known.module_class, spec.module_class) and known.layer == spec.layer):
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec


def register_method(name: str, *, display_name: str, citation: str, lr: float, optimizer: str = "adamw",
                    hooks: Optional[type] = None, recipe: Optional[Mapping[str, Any]] = None,
                    options: Optional[Mapping[str, Callable]] = None,
                    run_defaults: Optional[Mapping[str, Any]] = None):
    """Class decorator registering a method class (``AdapterLinear`` or ``Learner`` subclass) as method ``name``;
    ``options``: defaults of its options that a run resolves from its ``(shots, dataset)``; ``run_defaults``: of
    the run's method-default settings (targets, template)."""

    def decorator(cls):
        _add(MethodSpec(name, name, display_name, citation, float(lr), optimizer, hooks, cls, dict(recipe or {}),
                        dict(options or {}), run_defaults=dict(run_defaults or {})))
        cls.method_name = name
        return cls

    return decorator


def register_preset(name: str, *, layer: str, display_name: str, citation: str, lr: float,
                    optimizer: str = "adamw", hooks: Optional[type] = None,
                    recipe: Optional[Mapping[str, Any]] = None, options: Optional[Mapping[str, Any]] = None,
                    run_defaults: Optional[Mapping[str, Any]] = None) -> MethodSpec:
    """Register ``name`` as method ``layer``'s modules trained with optimizer builder ``optimizer`` (and its recipe,
    hooks, defaults of the method's ``options`` and of the run's settings, if given: a paper's named setting, e.g.
    CoOp (4))."""
    spec = MethodSpec(name, layer, display_name, citation, float(lr), optimizer, hooks, None, dict(recipe or {}),
                      dict(options or {}), dict(run_defaults or {}))
    _add(spec)
    return spec


def register_optimizer(name: str, options_class: Optional[type] = None, algorithm: str = "adamw"):
    """Decorator registering a parameter-group builder ``fn(model, lr, weight_decay, options)`` stepped by
    ``algorithm``."""

    def decorator(fn):
        _OPTIMIZERS[name] = OptimizerSpec(name, fn, options_class, algorithm)
        return fn

    return decorator


def registered_methods() -> dict[str, MethodSpec]:
    """What has been registered so far (``catalog`` imports every method first)."""
    return dict(_METHODS)


def registered_optimizers() -> dict[str, OptimizerSpec]:
    return dict(_OPTIMIZERS)


def lookup_method(name: str) -> MethodSpec:
    """The registered method ``name`` among those imported; a one-line error lists the known names otherwise."""
    try:
        spec = _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {', '.join(sorted(_METHODS))}") from None
    if spec.layer not in _METHODS or _METHODS[spec.layer].module_class is None:
        raise ValueError(f"method {name!r} is built on {spec.layer!r}, which is not a registered method class")
    return spec


def lookup_optimizer(name: str) -> OptimizerSpec:
    try:
        return _OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(sorted(_OPTIMIZERS))}") from None
