"""DyLoRA (Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation", EACL 2023).

LoRA factors of maximum rank r trained so that every truncation works: each
training step samples ``b ~ U{1..r}`` (one seeded generator, so runs repeat)
and the forward uses ``B[:, :b] A[:b]`` with the scale of rank b
(``α/b``, or ``α/√b`` with ``rslora``). Evaluation and ``merge`` use the full
rank, or ``eval_rank`` when set. All truncated components up to b are updated
(the paper's non-"frozen" variant). The sampler is a training-hook object
(``RankSampler``), not part of the layer; ``finish()`` returns every layer to
its evaluation rank. Defaults: r_max = 8 as in the paper's GLUE runs, α = r
(scale α/b with α = 8), CLIP-LoRA's dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .hooks import TrainingHooks
from .lora import LoraConfig, LoraLinear
from .registry import register_method


@dataclass
class DyLoraConfig(LoraConfig):
    rank: int = 8
    alpha: float = 8.0
    rslora: bool = False
    eval_rank: Optional[int] = None  # None: the full rank
    seed: int = 0                    # seed of the per-step rank sampler

    def __post_init__(self):
        super().__post_init__()
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.rank:
            raise ValueError(f"eval_rank must be in [1, rank={self.rank}], got {self.eval_rank}")



@register_method("dylora")
class DyLoraLinear(LoraLinear):
    config_class = DyLoraConfig

    def __init__(self, base_layer: nn.Linear, config: DyLoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        #: the truncation rank set by the sampler for this training step (None: evaluation rank)
        self.active_rank: Optional[int] = None

    @property
    def eval_rank(self) -> int:
        return self.config.eval_rank or self.config.rank

    def current_rank(self) -> int:
        if self.training and self.active_rank is not None:
            return min(self.active_rank, self.config.rank)
        return self.eval_rank

    def _delta(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b = self.eval_rank
        return self.config.scale_at(b) * (tensors["lora_B"][:, :b] @ tensors["lora_A"][:b])

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        b = self.current_rank()
        down, up = self.lora_A[:b].to(x.dtype), self.lora_B[:, :b].to(x.dtype)
        return self.config.scale_at(b) * ((x @ down.t()) @ up.t())

    @classmethod
    def training_hooks(cls, model: nn.Module, total_steps: int) -> "RankSampler":
        return RankSampler(model)


class RankSampler(TrainingHooks):
    """Before each step, draw one rank ``b ~ U{1..r}`` and set it on every DyLoRA layer."""

    def __init__(self, model: nn.Module):
        from .inject import adapter_modules

        self.adapters = [a for a in adapter_modules(model).values() if isinstance(a, DyLoraLinear)]
        if not self.adapters:
            raise ValueError("model has no dylora adapters")
        self.max_rank = max(a.config.rank for a in self.adapters)
        self.generator = torch.Generator().manual_seed(self.adapters[0].config.seed)
        self.sampled: list[int] = []

    def before_forward(self, step: int) -> None:
        rank = int(torch.randint(1, self.max_rank + 1, (1,), generator=self.generator))
        self.sampled.append(rank)
        for adapter in self.adapters:
            adapter.active_rank = rank

    def finish(self) -> None:
        for adapter in self.adapters:
            adapter.active_rank = None

    def summary(self) -> dict:
        counts = torch.bincount(torch.tensor(self.sampled, dtype=torch.long), minlength=self.max_rank + 1)
        return {"dylora_eval_rank": self.adapters[0].eval_rank,
                "dylora_sampled_rank_counts": {str(r): int(counts[r]) for r in range(1, self.max_rank + 1)}}
