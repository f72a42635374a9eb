"""Method registry: one decorator beside each adapter class, with the metadata tables and sweeps need.

    @register_method("nora", display_name="NoRA", citation="Li et al., ICCV 2025",
                     lr=1e-3)   # the protocol's learning rate, with a comment saying where it comes from
    class NoraLinear(AdapterLinear): ...

    register_preset("loraplus", layer="lora", optimizer="loraplus", display_name="LoRA+", ...)

A *layer method* is an ``AdapterLinear`` subclass; a *preset* is a registered
layer trained with another optimizer builder (LoRA+ = LoRA layers + the LoRA+
optimizer), so it stays runnable by name. Each registration carries the display
name (tables), the citation (docs, ``--help``), the protocol learning rate (the
runner's default), the optimizer builder the method trains with, and the
training schedule (AdaLoRA's rank allocator, DyLoRA's rank sampler), if any.

Every module of the ``lora_zoo`` package that registers something (a top-level
``@register_method``, ``register_preset`` or ``@register_optimizer``) is imported
the first time the registry is asked (``list_methods``, ``get_method``), so adding
a method is one new file in ``lora_zoo/``: nothing lists methods by hand, and a
lookup never imports the pipeline.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .options import OptionError, field_names

_METHODS: dict[str, "MethodSpec"] = {}
_DISCOVERED = False


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: how its adapters are built and trained, and how it is named."""

    name: str
    layer: str            # the layer method its adapters are (itself, for a layer method)
    display_name: str     # as in tables (e.g. "LoRA+")
    citation: str         # paper the method comes from
    lr: float             # the protocol's learning rate for this method (the runner's default)
    optimizer: str        # optimizer builder (lora_zoo.optim) it trains with by default
    schedule: Optional[type] = None       # TrainingHooks subclass driving it from the loop, or None
    adapter_class: Optional[type] = None  # the AdapterLinear subclass (layer methods only)

    @property
    def layer_class(self) -> type:
        return _METHODS[self.layer].adapter_class

    @property
    def config_class(self) -> type:
        """The layer's config dataclass: what is saved with the adapters and rebuilds them."""
        return self.layer_class.config_class

    @property
    def schedule_options_class(self) -> Optional[type]:
        return getattr(self.schedule, "options_class", None)

    def option_classes(self) -> list[type]:
        """Every dataclass the method's options (``method_options``) go to: layer, then schedule."""
        return [c for c in (self.config_class, self.schedule_options_class) if c is not None]

    def split_options(self, options: Mapping[str, Any]) -> tuple[dict, dict]:
        """``(layer options, schedule options)`` from one mapping of method options."""
        layer_names = set(field_names(self.config_class))
        schedule_names = set(field_names(self.schedule_options_class)) if self.schedule_options_class else set()
        unknown = sorted(set(options) - layer_names - schedule_names)
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(unknown)} for method {self.name}; expected some of "
                              f"{', '.join(sorted(layer_names | schedule_names))}")
        layer = {k: v for k, v in options.items() if k in layer_names}
        schedule = {k: v for k, v in options.items() if k in schedule_names}
        return layer, schedule


def _same(a: Optional[type], b: Optional[type]) -> bool:
    """The same class, or the same class defined again (a module reloaded)."""
    return a is b or (a is not None and b is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))


def _add(spec: MethodSpec) -> None:
    known = _METHODS.get(spec.name)
    if known is not None and not (_same(known.adapter_class, spec.adapter_class) and known.layer == spec.layer):
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec


def register_method(name: str, *, display_name: str, citation: str, lr: float, optimizer: str = "adamw",
                    schedule: Optional[type] = None):
    """Class decorator registering an ``AdapterLinear`` subclass as layer method ``name``."""

    def decorator(cls):
        _add(MethodSpec(name, name, display_name, citation, float(lr), optimizer, schedule, cls))
        cls.method_name = name
        return cls

    return decorator


def register_preset(name: str, *, layer: str, display_name: str, citation: str, lr: float,
                    optimizer: str = "adamw", schedule: Optional[type] = None) -> MethodSpec:
    """Register ``name`` as layer method ``layer`` trained with optimizer builder ``optimizer``."""
    spec = MethodSpec(name, layer, display_name, citation, float(lr), optimizer, schedule)
    _add(spec)
    return spec


#: a line that registers a method, a preset or an optimizer builder at a module's top level
REGISTRATION = re.compile(r"^(@register_method|@register_optimizer|register_preset)\(", re.MULTILINE)


def registering_modules() -> list[str]:
    """The package's modules that register something, found by reading their source (nothing is imported)."""
    folder = Path(__file__).resolve().parent
    return sorted(path.stem for path in folder.glob("*.py") if REGISTRATION.search(path.read_text(encoding="utf-8")))


def discover() -> None:
    """Import, once, every module of the package that registers a method, preset or optimizer builder.

    Only those: a method lookup loads the methods (and torch), never the pipeline or open_clip.
    """
    global _DISCOVERED
    if _DISCOVERED:
        return
    for module in registering_modules():
        importlib.import_module(f"{__package__}.{module}")  # a module that fails to import fails every lookup
    _DISCOVERED = True


def protocol_lr(lr: Optional[float], method: str) -> float:
    """``lr`` as given, or (None) the method's registered protocol learning rate: the one place None is resolved."""
    return float(lr) if lr is not None else get_method(method).lr


def list_methods() -> list[str]:
    """Names of every registered method (layer methods and presets), sorted."""
    discover()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; a one-line error lists the known names otherwise."""
    discover()
    try:
        spec = _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {', '.join(list_methods())}") from None
    if spec.layer not in _METHODS or _METHODS[spec.layer].adapter_class is None:
        raise ValueError(f"method {name!r} is built on layer {spec.layer!r}, which is not a registered layer method")
    return spec
