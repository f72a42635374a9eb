"""What a method may add to the one training loop: a schedule object with step hooks.

The loop (``train.py``) calls, for every method:

    optimizer = build_optimizer(model, lr, ...)         # the method's optimizer builder (optim.py)
    hooks = training_hooks(model, total_steps, seed)    # the method's schedule, or no-op hooks
    for step in range(total_steps):
        hooks.before_forward(step)                      # e.g. DyLoRA samples a rank
        loss = task_loss + hooks.regularizer()          # e.g. AdaLoRA's orthogonality penalty
        loss.backward(); hooks.after_backward(step)     # gradients available, parameters not yet stepped
        optimizer.step(); hooks.after_step(step)        # e.g. AdaLoRA: importance from θ_{t+1}·g_t, budget at t
    hooks.finish(); hooks.summary()                     # e.g. final ranks, recorded in the results

The schedule is built after the hooks: ``hooks.restarts()`` names steps where a new part of the run starts,
as a ``schedule_cycles`` part does: the schedule from the base lr again and a fresh optimizer state (2SFS's
second stage, at 60% of the run: ``train.part_starts``).

A method registers its schedule class with ``@register_method(..., hooks=Cls)``.
The class is built as ``Cls(model, total_steps, seed, options)``: ``seed`` is the
run's seed (a sampler's generator is seeded from it) and ``options`` an instance
of ``Cls.options_class`` (the schedule's own settings, given with the method's
options but never saved with the adapters: they do not change what a layer
computes, so a checkpoint loads whatever schedule trained it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attached import method_setup
from .registry import lookup_method


class TrainingHooks:
    """No-op hooks; subclasses override what they need. ``options_class``: the schedule's settings."""

    options_class: type | None = None
    per_epoch: int = 1  # iterations per pass over the training set (the loop sets it): where epochs end

    def before_forward(self, step: int) -> None:
        pass

    def regularizer(self) -> torch.Tensor | float:
        return 0.0

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def restarts(self) -> tuple[int, ...]:
        """Steps at which a new part of the run starts: the schedule again from the base lr, a fresh optimizer
        state (2SFS's second stage, a new optimizer in their code)."""
        return ()

    def finish(self) -> None:
        """Called once after the last step (e.g. to restore full rank for evaluation)."""

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the schedule exactly (``resume.py``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def check_options(cls, layer_config, options) -> None:
        """Raise a one-line ``ValueError`` when ``options`` do not fit the layer config (before training)."""


def training_hooks(model: nn.Module, total_steps: int, seed: int = 0) -> TrainingHooks:
    """The method's schedule for a run of ``total_steps`` optimizer steps (no-op hooks if it has none)."""
    setup = method_setup(model)
    schedule = lookup_method(setup.method).hooks
    if schedule is None:
        return TrainingHooks()
    options = schedule.options_class(**setup.schedule_options) if schedule.options_class else None
    return schedule(model, total_steps, seed, options)
