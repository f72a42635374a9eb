"""LoRA+ (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024).

The adapter is plain LoRA (``lora.py``); only the optimizer differs: the B
factors get the learning rate ``λ · lr`` and the A factors ``lr`` (paper §4,
λ = 16 recommended). That is all this file says: a parameter-group builder.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lora import LoraConfig, LoraLinear
from .registry import register_method


@dataclass
class LoraPlusConfig(LoraConfig):
    lr_ratio: float = 16.0  # λ = lr_B / lr_A

    def __post_init__(self):
        super().__post_init__()
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio must be positive, got {self.lr_ratio}")


@register_method("loraplus")
class LoraPlusLinear(LoraLinear):
    config_class = LoraPlusConfig

    @classmethod
    def param_groups(cls, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Two groups: every ``lora_A`` at ``lr``, every ``lora_B`` at ``lr_ratio · lr``."""
        from .inject import adapter_modules

        groups: dict[tuple[str, float], dict] = {}
        for adapter in adapter_modules(model).values():
            for name, param in adapter.trainable_tensors().items():
                if not param.requires_grad:
                    continue
                ratio = adapter.config.lr_ratio if name == "lora_B" else 1.0
                group = groups.setdefault((name, ratio), {"name": name, "params": [], "lr": lr * ratio,
                                                          "weight_decay": weight_decay})
                group["params"].append(param)
        return list(groups.values())
