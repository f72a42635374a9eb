"""DyLoRA (Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation", EACL 2023).

LoRA factors of maximum rank r trained so that every truncation works: each
training step samples ``b ~ U{1..r}`` (one generator seeded from the run's seed)
and the forward uses ``B[:, :b] A[:b]`` with the scale of rank b
(``α/b``, or ``α/√b`` with ``rslora``). Evaluation and ``merge`` use the full
rank, or ``eval_rank`` when set. All truncated components up to b are updated
(the paper's non-"frozen" variant). The sampler is the method's training
schedule (``RankSampler``), not part of the layer; ``finish()`` returns every
layer to its evaluation rank. Defaults: r_max = 8 as in the paper's GLUE runs, α = r
(scale α/b with α = 8), CLIP-LoRA's dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .adapter import adapter_modules
from .hooks import TrainingHooks
from .lora import LoraConfig, LoraLinear
from .options import option
from .registry import register_method


@dataclass
class DyLoraConfig(LoraConfig):
    rank: int = option(8, "maximum rank r; each step trains a truncation b ~ U{1..r}")
    alpha: Optional[float] = option(8.0, "scale alpha/b at truncation b (alpha/sqrt(b) with rslora)")
    rslora: bool = option(False, "scale by alpha/sqrt(b) instead of alpha/b")
    eval_rank: Optional[int] = option(None, "rank used for evaluation and merging; null = r")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.rank:
            raise ValueError(f"eval_rank must be in [1, rank={self.rank}], got {self.eval_rank}")


class RankSampler(TrainingHooks):
    """Before each step, draw one rank ``b ~ U{1..r}`` (generator seeded from the run) for every DyLoRA layer."""

    def __init__(self, model: nn.Module, total_steps: int, seed: int = 0, options=None):
        self.adapters = [a for a in adapter_modules(model).values() if isinstance(a, DyLoraLinear)]
        if not self.adapters:
            raise ValueError("model has no dylora adapters")
        self.max_rank = max(a.config.rank for a in self.adapters)
        self.generator = torch.Generator().manual_seed(seed)
        self.sampled: list[int] = []

    def before_forward(self, step: int) -> None:
        rank = int(torch.randint(1, self.max_rank + 1, (1,), generator=self.generator))
        self.sampled.append(rank)
        for adapter in self.adapters:
            adapter.active_rank = rank

    def finish(self) -> None:
        for adapter in self.adapters:
            adapter.active_rank = None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "sampled": list(self.sampled)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.sampled = list(state["sampled"])

    def summary(self) -> dict:
        counts = torch.bincount(torch.tensor(self.sampled, dtype=torch.long), minlength=self.max_rank + 1)
        return {"dylora_eval_rank": self.adapters[0].eval_rank,
                "dylora_sampled_rank_counts": {str(r): int(counts[r]) for r in range(1, self.max_rank + 1)}}


# lr 2e-4: CLIP-LoRA's learning rate (dropout 0.25 likewise from its preset)
@register_method("dylora", display_name="DyLoRA", citation="Valipour et al., EACL 2023", lr=2e-4,
                 hooks=RankSampler)
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

    def truncated_factors(self, tensors: Mapping[str, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.config.scale_at(rank) * tensors["lora_B"][:, :rank], tensors["lora_A"][:rank]

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.truncated_factors(tensors, self.current_rank())

    def _delta(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        up, down = self.truncated_factors(tensors, self.eval_rank)  # merging always uses the evaluation rank
        return up @ down
