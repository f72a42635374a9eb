"""Every method of the zoo, imported by a plain import: the one list a new method's module joins.

The import contracts (``pyproject.toml``) see these imports like any other, so a method module
cannot import the pipeline without breaking a contract. Names are looked up here: importing this
module registers every method, preset and optimizer builder (``registry.py``), and loads torch but
neither open_clip nor the pipeline.

    from lora_zoo.catalog import get_method, list_methods
"""
from __future__ import annotations

from typing import Optional

# the method modules (each registers its method with @register_method, presets and optimizer builders)
from . import adalora, aira, clip_svd, dora, dylora, lokr, lora, lorafa, loraplus, maple, nora, optim  # noqa: F401
from . import pissa, plot, twostage, vera  # noqa: F401
from . import clip_adapter, lp_pp, taskres, tip_adapter  # noqa: F401  (heads)
from . import cocoop, coop, kgcoop, prograd  # noqa: F401  (prompt learners)
from .registry import (MethodSpec, OptimizerSpec, lookup_method, lookup_optimizer, registered_methods,
                       registered_optimizers)


def list_methods() -> list[str]:
    """Names of every registered method (method classes and presets), sorted."""
    return sorted(registered_methods())


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; a one-line error lists the known names otherwise."""
    return lookup_method(name)


def list_optimizers() -> list[str]:
    return sorted(registered_optimizers())


def get_optimizer(name: str) -> OptimizerSpec:
    """The registered optimizer builder ``name``; a one-line error lists the known names otherwise."""
    return lookup_optimizer(name)


def protocol_lr(lr: Optional[float], method: str) -> float:
    """``lr`` as given, or (None) the method's registered protocol learning rate: the one place None is resolved."""
    return float(lr) if lr is not None else get_method(method).lr
