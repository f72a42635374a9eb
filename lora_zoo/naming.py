"""The one naming rule that decides what trains, what is saved and what is counted (loralib's).

Every tensor an adapter owns is named with the prefix ``lora_``:

- ``lora_`` parameters that require grad are trained (the optimizer builders and
  ``count_trainable`` ask ``named_trainable_parameters``);
- ``lora_`` parameters and *persistent* buffers are saved and loaded
  (``adapter_state_dict``; the checkpoint module);
- non-persistent ``lora_`` buffers (NoRA's outer SVD factors, VeRA's seeded
  matrices) are derived again from the base weight when a layer is built.

Nothing else in the package tests names: this module is the rule.
"""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_PREFIX = "lora_"


def is_adapter_tensor(name: str) -> bool:
    """True when a (qualified) parameter/buffer name belongs to an adapter."""
    return name.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)


def named_trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters that require grad, by qualified name."""
    return {n: p for n, p in model.named_parameters() if is_adapter_tensor(n) and p.requires_grad}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors an optimizer should update."""
    return list(named_trainable_parameters(model).values())


def count_trainable(model: nn.Module) -> int:
    """Number of trainable adapter scalars."""
    return sum(p.numel() for p in trainable_parameters(model))


@torch.no_grad()
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every saved adapter tensor (``lora_`` parameters and persistent buffers), by qualified name."""
    return {n: t for n, t in model.state_dict().items() if is_adapter_tensor(n)}
