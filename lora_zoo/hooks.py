"""What a method may add to the one training loop: parameter groups and step hooks.

The loop (``train.py``) calls, for every method:

    groups = param_groups(model, lr, weight_decay)      # optimizer builder (LoRA+ gives B its own lr)
    hooks = training_hooks(model, total_steps)
    for step in range(total_steps):
        hooks.before_forward(step)                      # e.g. DyLoRA samples a rank
        loss = task_loss + hooks.regularizer()          # e.g. AdaLoRA's orthogonality penalty
        loss.backward(); hooks.after_backward(step)     # e.g. AdaLoRA's importance scores (grads available)
        optimizer.step(); hooks.after_step(step)        # e.g. AdaLoRA's budget schedule masks λ
    hooks.finish(); hooks.summary()                     # e.g. final ranks, recorded in the results

A method customises these by overriding the classmethods ``param_groups`` and
``training_hooks`` of its adapter class; the defaults are one parameter group
and no-op hooks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainingHooks:
    """No-op hooks; subclasses override what they need."""

    def before_forward(self, step: int) -> None:
        pass

    def regularizer(self) -> torch.Tensor | float:
        return 0.0

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        """Called once after the last step (e.g. to restore full rank for evaluation)."""

    def summary(self) -> dict[str, Any]:
        return {}


def _method_class(model: nn.Module):
    from .registry import get_method

    setup = getattr(model, "lora_zoo_setup", None)
    if setup is None:
        raise ValueError("model has no adapters from apply_adapters")
    return get_method(setup.method)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for the adapted ``model`` (the method decides; default: one group)."""
    return _method_class(model).param_groups(model, lr, weight_decay)


def training_hooks(model: nn.Module, total_steps: int) -> TrainingHooks:
    """The method's step hooks for a run of ``total_steps`` optimizer steps."""
    return _method_class(model).training_hooks(model, total_steps)
