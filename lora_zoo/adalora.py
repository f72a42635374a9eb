"""AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023).

Each layer holds an SVD-form update ``ΔW = s · P diag(λ ⊙ mask) Q`` with
``P ∈ R^{d_out×r}``, ``Q ∈ R^{r×d_in}`` (Gaussian, std 0.02), ``λ ∈ R^r`` (zeros,
so the model is unchanged at init), ``s = α / r`` and ``mask`` a persistent 0/1
buffer: a pruned triplet stays pruned after save/load and at evaluation. The
loss gets the orthogonality penalty ``γ Σ_layers (||PᵀP − I||²_F + ||QQᵀ − I||²_F)``
(paper eq. 4–5).

``RankAllocator`` (the method's training schedule, not part of the layer: its
options are never saved with the adapters) does the rest:

- importance, after every backward: per tensor entry ``I = |θ · ∇θ|``, smoothed
  ``Ī ← β₁ Ī + (1−β₁) I``, uncertainty ``Ū ← β₂ Ū + (1−β₂) |I − Ī|``,
  ``s(θ) = Ī · Ū``; a triplet's score is ``s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``
  (eq. 6–7, means over the P column and Q row as in the paper);
- budget (eq. 8), t counted in completed steps, T total steps:
  ``b(t) = b₀`` for t ≤ t_i, ``b_T + (b₀ − b_T)(1 − (t − t_i)/(T − t_i − t_f))³`` for
  t_i < t < T − t_f, ``b_T`` after; ``b₀ = init_rank × layers``,
  ``b_T = target_rank × layers``, ``t_i = t_init·T``, ``t_f = t_final·T``;
- every ``delta_t`` steps of the schedule (and once the final budget is reached)
  the globally top-``b(t)`` triplets are kept; the rest get mask 0 and λ = 0. A
  masked triplet receives no gradient, so its score decays and it rarely
  returns, but it may (the paper keeps P, Q of pruned triplets for that);
- ``summary()``: the final rank of every layer.

Defaults for CLIP: init_rank 3 → target_rank 2 (the paper starts at 1.5× the
target budget; 2 is the CLIP-LoRA rank), α = init_rank (s = 1, AdaLoRA's code
scales by α/r), γ = 0.1 and β₁ = β₂ = 0.85 (paper), t_init 10 %, t_final 30 %,
delta_t 10 (our choices for few-shot runs of 500–8000 steps). Trainable
parameters per matrix: ``r · (d_in + d_out) + r`` with r = init_rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, adapter_modules, positive_int
from .hooks import TrainingHooks
from .options import Options, option
from .registry import register_method

TRIPLET = ("lora_P", "lora_lambda", "lora_Q")


@dataclass
class AdaLoraConfig(AdapterConfig):
    init_rank: int = option(3, "rank r of P diag(lambda) Q before any pruning")
    alpha: Optional[float] = option(None, "scale s = alpha / init_rank; null = init_rank (s = 1)")
    dropout: float = option(0.0, "dropout on the adapter input")

    def __post_init__(self):
        super().__post_init__()
        positive_int("init_rank", self.init_rank)

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.init_rank) / self.init_rank


@dataclass
class AdaLoraSchedule(Options):
    """The rank allocator's settings (training only; a checkpoint does not depend on them)."""

    target_rank: int = option(2, "average rank per layer at the end of the budget schedule")
    orth_reg: float = option(0.1, "gamma of the orthogonality penalty")
    beta1: float = option(0.85, "EMA factor of the smoothed sensitivity")
    beta2: float = option(0.85, "EMA factor of the uncertainty")
    t_init: float = option(0.1, "fraction of steps before pruning starts")
    t_final: float = option(0.3, "fraction of final steps at the target budget")
    delta_t: int = option(10, "steps between reallocations during the schedule")

    def __post_init__(self):
        super().__post_init__()
        positive_int("target_rank", self.target_rank)
        positive_int("delta_t", self.delta_t)
        if not (0 <= self.t_init and 0 <= self.t_final and self.t_init + self.t_final < 1):
            raise ValueError(f"need t_init, t_final >= 0 and t_init + t_final < 1, got {self.t_init}, {self.t_final}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


def budget_schedule(step: int, total_steps: int, initial: int, target: int, t_init: float, t_final: float) -> int:
    """Total rank after ``step`` completed steps (paper eq. 8, cubic decrease from ``initial`` to ``target``)."""
    start = round(t_init * total_steps)
    end = total_steps - round(t_final * total_steps)
    if step <= start:
        return initial
    if step >= end:
        return target
    remaining = 1 - (step - start) / (end - start)
    return int(target + (initial - target) * remaining ** 3)


class RankAllocator(TrainingHooks):
    """AdaLoRA's importance scores, budget schedule and pruning, called from the training loop."""

    options_class = AdaLoraSchedule

    def __init__(self, model: nn.Module, total_steps: int, seed: int = 0, options: AdaLoraSchedule | None = None):
        self.adapters = {n: a for n, a in adapter_modules(model).items() if isinstance(a, AdaLoraLinear)}
        if not self.adapters:
            raise ValueError("model has no adalora adapters")
        self.config, self.total_steps = options or AdaLoraSchedule(), total_steps
        for adapter in self.adapters.values():
            self.check_options(adapter.config, self.config)
        self.initial_budget = sum(a.config.init_rank for a in self.adapters.values())
        self.target_budget = self.config.target_rank * len(self.adapters)
        self.smoothed: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}
        self.rank_history: list[int] = []  # total rank after each step

    @classmethod
    def check_options(cls, layer_config: AdaLoraConfig, options: AdaLoraSchedule) -> None:
        if options.target_rank > layer_config.init_rank:
            raise ValueError(f"target_rank {options.target_rank} exceeds init_rank {layer_config.init_rank}")

    def budget(self, step: int) -> int:
        c = self.config
        return budget_schedule(step, self.total_steps, self.initial_budget, self.target_budget, c.t_init, c.t_final)

    def regularizer(self) -> torch.Tensor | float:
        if self.config.orth_reg == 0:
            return 0.0
        return self.config.orth_reg * sum(a.orthogonality_penalty() for a in self.adapters.values())

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, adapter in self.adapters.items():
            for tensor_name in TRIPLET:
                param = getattr(adapter, tensor_name)
                if param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs()
                key = (name, tensor_name)
                if key not in self.smoothed:
                    self.smoothed[key] = torch.zeros_like(sensitivity)
                    self.uncertainty[key] = torch.zeros_like(sensitivity)
                self.smoothed[key].mul_(b1).add_(sensitivity, alpha=1 - b1)
                self.uncertainty[key].mul_(b2).add_((sensitivity - self.smoothed[key]).abs(), alpha=1 - b2)

    def triplet_scores(self, name: str) -> torch.Tensor:
        """``s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` for one layer (zeros before any gradient)."""
        adapter = self.adapters[name]
        score = torch.zeros(adapter.config.init_rank, device=adapter.lora_lambda.device)
        for tensor_name, reduce_dim in (("lora_lambda", None), ("lora_P", 0), ("lora_Q", 1)):
            key = (name, tensor_name)
            if key in self.smoothed:
                importance = self.smoothed[key] * self.uncertainty[key]
                score = score + (importance if reduce_dim is None else importance.mean(dim=reduce_dim))
        return score

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        done = step + 1
        budget = self.budget(done)
        current = self.rank_history[-1] if self.rank_history else self.total_rank()
        if budget < current and (done % self.config.delta_t == 0 or budget == self.target_budget):
            self._keep_top(budget)
            current = self.total_rank()
        for adapter in self.adapters.values():  # pruned λ stay exactly zero (AdamW moments would move them)
            adapter.lora_lambda.mul_(adapter.lora_rank_mask)
        self.rank_history.append(current)

    def total_rank(self) -> int:
        """Triplets in use over all layers (one device sync)."""
        return int(torch.stack([a.lora_rank_mask.sum() for a in self.adapters.values()]).sum().item())

    def _keep_top(self, budget: int) -> None:
        names = list(self.adapters)
        flat = torch.cat([self.triplet_scores(n).cpu() for n in names])
        keep = torch.zeros_like(flat)
        keep[torch.topk(flat, budget).indices] = 1.0
        offset = 0
        for name in names:
            mask = self.adapters[name].lora_rank_mask
            mask.copy_(keep[offset:offset + mask.numel()])
            offset += mask.numel()

    def final_ranks(self) -> dict[str, int]:
        return {name: adapter.rank for name, adapter in self.adapters.items()}

    def summary(self) -> dict:
        ranks = self.final_ranks()
        return {"adalora_final_ranks": ranks, "adalora_total_rank": sum(ranks.values()),
                "adalora_target_total_rank": self.target_budget}


# lr 5e-4: the low end of the paper's learning rates (5e-4 .. 1e-3 for DeBERTa); not tuned on test data
@register_method("adalora", display_name="AdaLoRA", citation="Zhang et al., ICLR 2023", lr=5e-4,
                 schedule=RankAllocator)
class AdaLoraLinear(AdapterLinear):
    config_class = AdaLoraConfig
    up_tensors, down_tensors = ("lora_P",), ("lora_Q",)

    def __init__(self, base_layer: nn.Linear, config: AdaLoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        rank, device = config.init_rank, base_layer.weight.device
        if rank > min(self.in_features, self.out_features):
            raise ValueError(f"adalora init_rank {rank} exceeds min(d_in, d_out) of a "
                             f"{self.out_features}×{self.in_features} layer")
        self.scale = config.scale
        self.lora_P = nn.Parameter(0.02 * torch.randn(self.out_features, rank, device=device))
        self.lora_lambda = nn.Parameter(torch.zeros(rank, device=device))
        self.lora_Q = nn.Parameter(0.02 * torch.randn(rank, self.in_features, device=device))
        self.register_buffer("lora_rank_mask", torch.ones(rank, device=device))

    @property
    def rank(self) -> int:
        """Triplets still in use."""
        return int(self.lora_rank_mask.sum().item())

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        values = tensors["lora_lambda"] * self.lora_rank_mask
        return self.scale * tensors["lora_P"] * values[None, :], tensors["lora_Q"]

    def orthogonality_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.config.init_rank, device=self.lora_P.device)
        return ((self.lora_P.t() @ self.lora_P - eye).pow(2).sum()
                + (self.lora_Q @ self.lora_Q.t() - eye).pow(2).sum())
