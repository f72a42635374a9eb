"""AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023),
computed as the official code (QingruZhang/AdaLoRA) and peft compute it.

Each layer holds an SVD-form update ``ΔW = s · P diag(λ) Q`` with
``P ∈ R^{d_out×r}``, ``Q ∈ R^{r×d_in}`` (Gaussian, std 0.02), ``λ ∈ R^r`` (zeros,
so the model is unchanged at init) and ``s = α / r`` (r = init_rank; the official
code and peft divide by ``r + 1e-5``, we do not). The layer uses λ as it is; a
persistent 0/1 buffer ``lora_rank_mask`` records the allocator's last decision
(the ranks, the summary, the checkpoint). As in peft, pruning a triplet sets its
λ to 0 but leaves it trainable: it gets a gradient and moves again until the
next decision, which may keep it; from the final decision on, pruned λ are
zeroed after every step, so the trained model has exactly the final pattern.

Orthogonality regulariser added to the loss (``orth_reg_form``):

- ``"official"`` (default, the official code and peft): ``γ · mean`` over the 2L
  matrices of all L adapted layers of ``||PᵀP − I||_F`` and ``||QQᵀ − I||_F``, un-squared;
- ``"paper"``: ``γ · Σ_layers (||PᵀP − I||²_F + ||QQᵀ − I||²_F)`` (eq. 4–5 as
  written): on ViT-B-16 q/k/v at init (72 layers, r = 3, γ = 0.1) 24.0 against 0.129,
  186× larger, with a 367× larger gradient.

Both use the r×r Gram matrices of the initial rank, pruned triplets included.

``RankAllocator`` (the method's training schedule, not part of the layer: its
options are never saved with the adapters) does the rest. With t the 0-based
index of the step just taken, T total steps, ``t_i = round(t_init·T)`` and
``t_F = T − round(t_final·T)``, in ``after_step(t)`` (after ``optimizer.step()``,
the step's gradients still present, as peft's ``update_and_allocate``):

- importance, for t < t_F: per tensor entry ``I = |θ · ∇θ|`` (θ after the step),
  smoothed ``Ī ← β₁ Ī + (1−β₁) I``, uncertainty ``Ū ← β₂ Ū + (1−β₂) |I − Ī|``,
  ``s(θ) = Ī · Ū``; a triplet's score is ``s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``
  (eq. 6–7). A step with any non-finite gradient leaves the averages untouched
  (counted in the summary);
- budget at step t (eq. 8, peft's ``budget_schedule``): ``b₀ = Σ init_rank`` for
  t ≤ t_i, ``int(b_T + (b₀ − b_T)(1 − (t − t_i)/(t_F − t_i))³)`` after, ``b_T = target_rank × L``;
- decisions, for t_i < t < t_F with ``t % delta_t == 0``: τ is the (b₀ − b(t))-th
  smallest triplet score over all layers; triplets scoring above τ are kept
  (ties at τ are pruned, as in peft), the others get mask 0 and λ = 0. The mask
  is recomputed from scratch each time, so a pruned triplet can come back;
- at t = t_F a last decision at b_T, after which the averages are cleared and the
  pattern is frozen: for t > t_F pruned λ are zeroed after every step;
- ``finish()`` zeroes pruned λ once more (only matters when round(t_final·T) = 0);
  ``summary()``: the final rank of every layer.

Defaults for CLIP: init_rank 3 → target_rank 2 (the paper starts at 1.5× the
target budget; 2 is the CLIP-LoRA rank), α = init_rank (s = 1), γ = 0.1 (the
official code's examples; peft's default is 0.5) and β₁ = β₂ = 0.85 (paper),
t_init 10 %, t_final 30 %, delta_t 10 (our choices for few-shot runs of 500–8000
steps). Trainable parameters per matrix: ``r · (d_in + d_out) + r`` with r = init_rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, adapter_modules, check_rank_fits, dropout_option, positive_int
from .hooks import TrainingHooks
from .options import Options, option
from .registry import register_method

TRIPLET = ("lora_P", "lora_lambda", "lora_Q")


@dataclass
class AdaLoraConfig(AdapterConfig):
    init_rank: int = option(3, "rank r of P diag(lambda) Q before any pruning")
    alpha: Optional[float] = option(None, "scale s = alpha / init_rank; null = init_rank (s = 1)")
    dropout: float = dropout_option(0.0)

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
    orth_reg: float = option(0.1, "gamma of the orthogonality regulariser")
    orth_reg_form: Literal["official", "paper"] = option(
        "official", "official: gamma * mean over all P, Q of ||P'P - I||_F (AdaLoRA's code, peft); "
                    "paper: gamma * sum over layers of the squared norms (eq. 4-5)")
    beta1: float = option(0.85, "EMA factor of the smoothed sensitivity")
    beta2: float = option(0.85, "EMA factor of the uncertainty")
    t_init: float = option(0.1, "fraction of steps before pruning starts")
    t_final: float = option(0.3, "fraction of final steps at the target budget")
    delta_t: int = option(10, "steps between reallocations during the schedule")

    def __post_init__(self):
        super().__post_init__()
        positive_int("target_rank", self.target_rank)
        positive_int("delta_t", self.delta_t)
        if self.orth_reg < 0:
            raise ValueError(f"orth_reg must be >= 0, got {self.orth_reg}")
        if not (0 <= self.t_init and 0 <= self.t_final and self.t_init + self.t_final < 1):
            raise ValueError(f"need t_init, t_final >= 0 and t_init + t_final < 1, got {self.t_init}, {self.t_final}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


def budget_schedule(step: int, total_steps: int, initial: int, target: int, t_init: float, t_final: float) -> int:
    """Total rank at 0-based step ``step`` (paper eq. 8, peft's ``budget_schedule``): cubic from ``initial``
    after ``round(t_init·T)`` steps down to ``target`` at ``T − round(t_final·T)``."""
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
        self.start_step = round(self.config.t_init * total_steps)
        self.final_step = total_steps - round(self.config.t_final * total_steps)
        self.smoothed: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}
        self.decisions: list[tuple[int, int]] = []  # (step, budget) of every decision
        self.rank_history: list[int] = []           # total rank recorded after each step
        self.skipped_steps = 0                      # importance updates skipped for non-finite gradients
        self._total_rank = self.total_rank()

    def state_dict(self) -> dict:
        """The importance averages and the decision records (the masks live in the adapters' buffers)."""
        return {"smoothed": {"|".join(k): v.clone() for k, v in self.smoothed.items()},
                "uncertainty": {"|".join(k): v.clone() for k, v in self.uncertainty.items()},
                "decisions": list(self.decisions), "rank_history": list(self.rank_history),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.adapters.values())).lora_lambda.device
        self.smoothed = {tuple(k.split("|")): v.to(device) for k, v in state["smoothed"].items()}
        self.uncertainty = {tuple(k.split("|")): v.to(device) for k, v in state["uncertainty"].items()}
        self.decisions = [tuple(d) for d in state["decisions"]]
        self.rank_history = list(state["rank_history"])
        self.skipped_steps = state["skipped_steps"]
        self._total_rank = self.total_rank()

    @classmethod
    def check_options(cls, layer_config: AdaLoraConfig, options: AdaLoraSchedule) -> None:
        if options.target_rank > layer_config.init_rank:
            raise ValueError(f"target_rank {options.target_rank} exceeds init_rank {layer_config.init_rank}")

    def budget(self, step: int) -> int:
        c = self.config
        return budget_schedule(step, self.total_steps, self.initial_budget, self.target_budget, c.t_init, c.t_final)

    def regularizer(self) -> torch.Tensor | float:
        c = self.config
        if c.orth_reg == 0:
            return 0.0
        residuals = [m for a in self.adapters.values() for m in a.orthogonality_residuals()]
        if c.orth_reg_form == "paper":
            return c.orth_reg * sum(m.pow(2).sum() for m in residuals)
        return c.orth_reg * torch.stack([torch.linalg.matrix_norm(m) for m in residuals]).mean()

    @torch.no_grad()
    def update_importance(self) -> bool:
        """One EMA update from the current ``θ · ∇θ``; ``False`` (nothing changed) if a gradient is not finite."""
        params = {(name, t): getattr(a, t) for name, a in self.adapters.items() for t in TRIPLET}
        params = {key: p for key, p in params.items() if p.grad is not None}
        if not params:
            return False
        if not bool(torch.stack([p.grad.isfinite().all() for p in params.values()]).all()):
            self.skipped_steps += 1
            return False
        b1, b2 = self.config.beta1, self.config.beta2
        for key, param in params.items():
            sensitivity = (param * param.grad).abs()
            if key not in self.smoothed:
                self.smoothed[key] = torch.zeros_like(sensitivity)
                self.uncertainty[key] = torch.zeros_like(sensitivity)
            self.smoothed[key].mul_(b1).add_(sensitivity, alpha=1 - b1)
            self.uncertainty[key].mul_(b2).add_((sensitivity - self.smoothed[key]).abs(), alpha=1 - b2)
        return True

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
        """After ``optimizer.step()`` of 0-based step ``step``, with its gradients still present."""
        if step < self.final_step:
            self.update_importance()
            if self.start_step < step and step % self.config.delta_t == 0:
                self.allocate(step, self.budget(step))
        elif step == self.final_step:
            self.allocate(step, self.target_budget)
            self.smoothed.clear()
            self.uncertainty.clear()
        else:
            self._zero_pruned()
        self.rank_history.append(self._total_rank)

    @torch.no_grad()
    def allocate(self, step: int, budget: int) -> None:
        """Keep the triplets scoring above the (b₀ − budget)-th smallest score (ties pruned); zero λ of the rest."""
        names = list(self.adapters)
        scores = torch.cat([self.triplet_scores(n) for n in names])
        if budget >= self.initial_budget:
            keep = torch.ones_like(scores)
        else:
            threshold = torch.kthvalue(scores, self.initial_budget - budget).values
            keep = (scores > threshold).to(scores.dtype)
        offset = 0
        for name in names:
            mask = self.adapters[name].lora_rank_mask
            mask.copy_(keep[offset:offset + mask.numel()])
            offset += mask.numel()
        self._zero_pruned()
        self.decisions.append((step, budget))
        self._total_rank = self.total_rank()

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        for adapter in self.adapters.values():
            adapter.lora_lambda.mul_(adapter.lora_rank_mask)

    def finish(self) -> None:
        self._zero_pruned()

    def total_rank(self) -> int:
        """Triplets kept by the last decision over all layers (one device sync)."""
        return int(torch.stack([a.lora_rank_mask.sum() for a in self.adapters.values()]).sum().item())

    def final_ranks(self) -> dict[str, int]:
        return {name: adapter.rank for name, adapter in self.adapters.items()}

    def summary(self) -> dict:
        ranks = self.final_ranks()
        return {"adalora_final_ranks": ranks, "adalora_total_rank": sum(ranks.values()),
                "adalora_target_total_rank": self.target_budget,
                "adalora_skipped_importance_steps": self.skipped_steps}


# lr 5e-4: the low end of the paper's learning rates (5e-4 .. 1e-3 for DeBERTa); not tuned on test data
@register_method("adalora", display_name="AdaLoRA", citation="Zhang et al., ICLR 2023", lr=5e-4,
                 hooks=RankAllocator)
class AdaLoraLinear(AdapterLinear):
    """``s · P diag(λ) Q``; ``lora_rank_mask`` records which triplets the last allocation kept."""

    config_class = AdaLoraConfig
    up_tensors, down_tensors = ("lora_P",), ("lora_Q",)

    def __init__(self, base_layer: nn.Linear, config: AdaLoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        rank, device = config.init_rank, base_layer.weight.device
        check_rank_fits("adalora", "init_rank", rank, self.in_features, self.out_features)
        self.scale = config.scale
        self.lora_P = nn.Parameter(0.02 * torch.randn(self.out_features, rank, device=device))
        self.lora_lambda = nn.Parameter(torch.zeros(rank, device=device))
        self.lora_Q = nn.Parameter(0.02 * torch.randn(rank, self.in_features, device=device))
        self.register_buffer("lora_rank_mask", torch.ones(rank, device=device))

    @classmethod
    def check_fits(cls, config: AdaLoraConfig, out_features: int, in_features: int) -> None:
        check_rank_fits("adalora", "init_rank", config.init_rank, in_features, out_features)

    @property
    def rank(self) -> int:
        """Triplets kept by the last allocation (all of them before the first)."""
        return int(self.lora_rank_mask.sum().item())

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale * tensors["lora_P"] * tensors["lora_lambda"][None, :], tensors["lora_Q"]

    def orthogonality_residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(PᵀP − I, QQᵀ − I)``, both r×r with r = init_rank (pruned triplets included)."""
        eye = torch.eye(self.config.init_rank, device=self.lora_P.device)
        return self.lora_P.t() @ self.lora_P - eye, self.lora_Q @ self.lora_Q.t() - eye
