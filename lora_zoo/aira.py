"""AIRA — Activation-Informed Low-Rank Adaptation (Li et al., ICCV 2025).

A LoRA update ``ΔW = s · diag(m) B A`` with three switchable components
(METHODS.md, "AIRA"), so the paper's ablation can be run:

(a) ``init="owsvd"``: outlier-weighted SVD, ``W diag(s)^β = U Σ Vᵀ``,
    ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ diag(s)^{-β}`` (s: input channel
    mean |x|); with ``residual`` (default) W ← W − ΔW(θ₀). ``init="lora"`` starts
    A/B as LoRA does.
(b) ``rank_alloc=True``: per-layer ranks from outlier scores by water-filling
    under the parameter budget of uniform rank ``rank`` (``rank_allocation.py``);
    the allocation is stored in the model's setup and saved with checkpoints.
(c) ``act_scale=True``: ``m = (o / mean(o))^γ`` from the calibrated output
    statistic o, a fixed buffer, so the adapter stays mergeable.
    ``act_scale="batch"`` reproduces the authors' per-batch min–max scaling of
    the live output (batch-dependent predictions; not mergeable, and the
    residual then no longer cancels the init exactly).

Scale ``s = α / r`` with α defaulting to r (s = 1), per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, positive_int
from .lora import kaiming_rows
from .options import option
from .rank_allocation import allocate_ranks, outlier_score
from .registry import register_method
from .svd import weighted_svd


@dataclass
class AiraConfig(AdapterConfig):
    rank: int = option(8, "rank r (with rank_alloc: the uniform rank whose parameter count is the budget)")
    alpha: Optional[float] = option(None, "scale s = alpha / r per layer; null = r (s = 1)")
    init: Literal["owsvd", "lora"] = option("owsvd", "owsvd (outlier-weighted SVD of W diag(s)^beta) | lora")
    owsvd_beta: float = option(1.0, "beta of the owSVD weighting")
    residual: bool = option(True, "W <- W - dW(theta_0): the model is unchanged at init")
    rank_alloc: bool = option(True, "outlier-driven per-layer ranks (water-filling under the budget)")
    outlier_threshold: float = option(5.0, "M: an entry is an outlier when |W_jk| n_k > M mean(|W| n)")
    rank_min: int = option(2, "smallest per-layer rank")
    rank_max: int = option(32, "largest per-layer rank")
    rank_budget: Optional[int] = option(None, "total sum of (d_in + d_out) r_i; null = that of uniform rank r")
    act_scale: Union[bool, Literal["batch"]] = option(True, "diag(m) from calibrated output |z| (true) | "
                                                            "'batch': the authors' per-batch min-max (not mergeable)")
    act_gamma: float = option(1.0, "gamma: m = (o / mean o)^gamma")

    def __post_init__(self):
        super().__post_init__()
        positive_int("rank", self.rank)

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def needs_calibration(self) -> bool:
        return self.init == "owsvd" or self.act_scale is True or self.rank_alloc

    @property
    def mergeable(self) -> bool:
        return self.act_scale != "batch"


def _need_stats(stats, what: str):
    if stats is None:
        raise ValueError(f"aira {what} needs calibration stats from collect_activation_stats "
                         "(or switch that component off)")
    return stats


# lr 5e-4: the authors swept 1e-4 .. 1e-3 for AIRA; inside that range, not tuned on a test split
@register_method("aira", display_name="AIRA", citation="Li et al., ICCV 2025", lr=5e-4)
class AiraLinear(AdapterLinear):
    config_class = AiraConfig
    up_tensors, down_tensors = ("lora_B",), ("lora_A",)

    def __init__(self, base_layer: nn.Linear, config: AiraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        self.rank = config.rank
        self.scale = config.scale
        weight = base_layer.weight
        if config.init == "owsvd":
            col_scale = _need_stats(stats, "init='owsvd'").input_abs_mean
            u, sigma, vt = weighted_svd(weight, self.rank, col_scale, config.owsvd_beta)
            root = sigma.sqrt()
            self.lora_A = nn.Parameter(root[:, None] * vt)
            self.lora_B = nn.Parameter(u * root[None, :])
        else:
            self.lora_A = nn.Parameter(kaiming_rows(self.rank, self.in_features, weight))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=weight.device))
        if config.act_scale is True:
            out_abs = _need_stats(stats, "act_scale=True").output_abs_mean.to(weight.device).float()
            importance = (out_abs / out_abs.mean().clamp_min(1e-12)) ** config.act_gamma
            self.register_buffer("lora_output_scale", importance)
        else:
            self.register_buffer("lora_output_scale", None)
        if config.residual:
            self._make_residual()

    @classmethod
    def plan_layers(cls, linears, stats, config: AiraConfig):
        """Outlier-driven per-layer ranks (component (b)); ``{}`` when rank_alloc is off."""
        if not config.rank_alloc:
            return {}
        stats = _need_stats(stats, "rank_alloc=True")
        names = list(linears)
        scores = [outlier_score(linears[n].weight, stats[n].input_l2, config.outlier_threshold) for n in names]
        costs = [linears[n].in_features + linears[n].out_features for n in names]
        budget = config.rank_budget if config.rank_budget is not None else sum(costs) * config.rank
        ranks = allocate_ranks(scores, costs, budget, config.rank_min, config.rank_max, uniform_rank=config.rank)
        return {n: {"rank": r} for n, r in zip(names, ranks)}

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.scale * tensors["lora_B"]
        if self.lora_output_scale is not None:  # diag(m) folded into B: no extra per-token work
            up = self.lora_output_scale[:, None] * up
        return up, tensors["lora_A"]

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        out = super().adapter_output(x, base_output)
        if self.config.act_scale == "batch":
            magnitude = base_output.detach().abs().reshape(-1, base_output.shape[-1]).mean(0)
            low, high = magnitude.min(), magnitude.max()
            out = out * ((magnitude - low) / (high - low).clamp_min(1e-12)).to(out.dtype)
        return out
