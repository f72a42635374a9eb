"""LoRA (Hu et al., ICLR 2022) as used by CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024).

``ΔW = s · B A`` with ``A ∈ R^{r×d_in}`` Kaiming-uniform(a=√5), ``B ∈ R^{d_out×r}``
zeros, dropout on the adapter input, ``s = α/r`` or ``α/√r`` with ``rslora``.
The defaults are the CLIP-LoRA preset: r=2, α=1, rslora=True, dropout 0.25
(CLIP-LoRA's published code scales by α/√r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, dropout_option, fan_uniform, positive_int
from .options import option
from .registry import register_method


@dataclass
class LoraConfig(AdapterConfig):
    rank: int = option(2, "rank r of the update B A")
    alpha: Optional[float] = option(1.0, "scale numerator: s = alpha/r (alpha/sqrt(r) with rslora); null = r")
    rslora: bool = option(True, "scale by alpha/sqrt(r) instead of alpha/r")
    dropout: float = dropout_option(0.25)

    def __post_init__(self):
        super().__post_init__()
        positive_int("rank", self.rank)

    def scale_at(self, rank: int) -> float:
        """``α/rank`` (``α/√rank`` with rslora); α = None means α = rank. DyLoRA asks for truncated ranks."""
        alpha = self.alpha if self.alpha is not None else float(rank)
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    @property
    def scale(self) -> float:
        return self.scale_at(self.rank)


# lr 2e-4: CLIP-LoRA's published learning rate (Zanella & Ben Ayed, CVPRW 2024)
@register_method("lora", display_name="CLIP-LoRA", citation="Hu et al., ICLR 2022; Zanella & Ben Ayed, CVPRW 2024",
                 lr=2e-4)
class LoraLinear(AdapterLinear):
    """Plain low-rank update; subclasses (PiSSA, DoRA, DyLoRA) reuse its A/B tensors."""

    config_class = LoraConfig
    up_tensors, down_tensors = ("lora_B",), ("lora_A",)

    def __init__(self, base_layer: nn.Linear, config: LoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        weight = base_layer.weight
        self.scale = config.scale
        # A as nn.Linear initialises a weight (Kaiming-uniform, a=√5: bound 1/√d_in)
        self.lora_A = nn.Parameter(fan_uniform((config.rank, self.in_features), self.in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=weight.device))

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # the scale is folded into B (r × d_out values) rather than applied to every token's output
        return self.scale * tensors["lora_B"], tensors["lora_A"]
