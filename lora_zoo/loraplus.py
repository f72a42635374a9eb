"""LoRA+ (Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024).

LoRA+ changes only the optimizer: the output-side factors (LoRA's B) get the
learning rate ``λ · lr`` and the input-side ones (A) ``lr`` (paper §4, λ = 16
recommended). Here it is an optimizer builder, so it works with any method
(``--optimizer loraplus --lr_ratio 16``, e.g. with PiSSA, DoRA or NoRA), and a
preset ``loraplus`` = LoRA layers (CLIP-LoRA preset) + this optimizer, the
baseline of the NoRA paper's Table 2.

Groups as peft's ``create_loraplus_optimizer`` forms them: every adapter's
``up_tensors`` and every 1-D trainable adapter tensor (DoRA's magnitude,
AdaLoRA's λ, VeRA's vectors) at ``λ · lr``; every other trainable tensor at ``lr``;
one weight decay for all (adapter tensors are neither biases nor norms).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapter import adapter_modules
from .options import Options, option
from .optim import register_optimizer
from .registry import register_preset


@dataclass
class LoraPlusOptions(Options):
    lr_ratio: float = option(16.0, "lambda = lr of the output-side factors / lr")

    def __post_init__(self):
        super().__post_init__()
        if not self.lr_ratio > 0:
            raise ValueError(f"lr_ratio must be positive, got {self.lr_ratio}")


@register_optimizer("loraplus", LoraPlusOptions)
def loraplus_groups(model: nn.Module, lr: float, weight_decay: float, options: LoraPlusOptions) -> list[dict]:
    """Two groups: output-side and 1-D adapter tensors at ``lr_ratio · lr``, the rest at ``lr``."""
    fast, slow = [], []
    for adapter in adapter_modules(model).values():
        for name, param in adapter.trainable_tensors().items():
            if param.requires_grad:
                (fast if name in adapter.up_tensors or param.ndim == 1 else slow).append(param)
    return [{"name": "down (A)", "params": slow, "lr": lr, "weight_decay": weight_decay},
            {"name": "up (B)", "params": fast, "lr": lr * options.lr_ratio, "weight_decay": weight_decay}]


# lr 2e-4: CLIP-LoRA's learning rate, used for A (B then trains at 3.2e-3)
register_preset("loraplus", layer="lora", optimizer="loraplus", display_name="LoRA+",
                citation="Hayou, Ghosh & Yu, ICML 2024", lr=2e-4)
