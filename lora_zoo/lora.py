"""LoRA (Hu et al., ICLR 2022) as used by CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024).

``ΔW = s · B A`` with ``A ∈ R^{r×d_in}`` Kaiming-uniform(a=√5), ``B ∈ R^{d_out×r}``
zeros, dropout on the adapter input, ``s = α/r`` or ``α/√r`` with ``rslora``.
The defaults are the CLIP-LoRA preset: r=2, α=1, rslora=True, dropout 0.25.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, positive_int
from .registry import register_method


@dataclass
class LoraConfig(AdapterConfig):
    rank: int = 2
    alpha: float = 1.0
    rslora: bool = True
    dropout: float = 0.25

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


def kaiming_rows(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows × cols) matrix initialised like ``nn.Linear`` weights (Kaiming-uniform, a=√5)."""
    weight = torch.empty(rows, cols, device=like.device, dtype=torch.float32)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


@register_method("lora")
class LoraLinear(AdapterLinear):
    """Plain low-rank update; subclasses (LoRA-FA, LoRA+, DyLoRA…) reuse its A/B tensors."""

    config_class = LoraConfig

    def __init__(self, base_layer: nn.Linear, config: LoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        weight = base_layer.weight
        self.scale = config.scale
        self.lora_A = nn.Parameter(kaiming_rows(config.rank, self.in_features, weight))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=weight.device))

    def _delta(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * (tensors["lora_B"] @ tensors["lora_A"])

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        # the scale is folded into B (r × d_out values) rather than applied to every token's output
        return (x @ self.lora_A.t().to(x.dtype)) @ (self.scale * self.lora_B).t().to(x.dtype)
