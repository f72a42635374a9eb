"""AIRA — Activation-Informed Low-Rank Adaptation (Li et al., ICCV 2025).

A LoRA update ``ΔW = s · diag(m) B A`` with three switchable components
(METHODS.md, "AIRA"), so the paper's ablation can be run:

(a) ``init="owsvd"``: outlier-weighted SVD, ``W diag(s)^β = U Σ Vᵀ``,
    ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ diag(s)^{-β}`` (s: input channel
    mean |x|); with ``residual`` W ← W − ΔW(θ₀). ``init="lora"`` starts A/B as
    LoRA does; ``init="authors_svd"`` reproduces the authors' CLIP code.
(b) ``rank_alloc``: per-layer ranks from an importance per layer (outlier score
    or first-token output norm) by water-filling under a parameter budget
    (``rank_allocation.py``), clipped to min(d_in, d_out); stored in the model's
    setup, saved with checkpoints.
(c) ``act_scale=True``: ``m = (o / mean(o))^γ`` from the calibrated output
    statistic o, a fixed buffer, so the adapter stays mergeable.
    ``act_scale="batch"``: the authors' per-batch scaling of the live output
    (``batch_output_scale``): predictions depend on the batch, not mergeable, and
    with an SVD init no residual (it could not keep the model unchanged at init).

``variant`` picks the defaults of the options marked "variant" (``VARIANT_DEFAULTS``,
resolved when the config is built, so a saved config holds explicit values):
``"paper"`` follows METHODS.md; ``"authors"`` reproduces what the authors' CLIP path
runs (lliai/LoRA-Zoo ``aira/main_awlora.py``, ``aira/loralib/lora_lib.py`` ``AwLinear``,
``aira/lora.py`` ``optim_layers_rank``): plain-SVD init with their indexing, no
residual, scale α = 2 not divided by r, per-batch activation scaling, rank
allocation by importance "act" floored, budget 0.7·2²⁰ parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, check_rank_fits, fan_uniform, positive_int
from .options import option
from .rank_allocation import allocate_ranks, outlier_score
from .registry import register_method
from .svd import _single_threaded, weighted_svd

#: defaults of the options that depend on ``variant`` (their dataclass default is None)
VARIANT_DEFAULTS = {
    "paper": dict(rank=8, alpha=None, scale_by_rank=True, init="owsvd", residual=True, act_scale=True,
                  rank_importance="lod", rank_rounding="greedy", rank_max=32, rank_budget=None,
                  calibration="standard"),
    # the authors' CLIP run (aira/run_utils_awlora.py): r 16 (used where no rank is allocated), alpha 2,
    # scaling = alpha; theta_type 'act'; SLSQP bounds [2, max_rank + 1] = [2, 33]; rank_budget 0.7 * 1024**2
    "authors": dict(rank=16, alpha=2.0, scale_by_rank=False, init="authors_svd", residual=False, act_scale="batch",
                    rank_importance="act", rank_rounding="floor", rank_max=33, rank_budget=0.7 * 2 ** 20,
                    calibration="authors"),
}


@dataclass
class AiraConfig(AdapterConfig):
    variant: Literal["paper", "authors"] = option("paper", "paper (METHODS.md) | authors (their CLIP code); sets "
                                                           "the defaults of the options marked 'variant'")
    rank: Optional[int] = option(None, "rank r (with rank_alloc: the fallback for all-zero importances and, "
                                       "without rank_budget, the uniform rank whose cost is the budget); "
                                       "variant: paper 8, authors 16")
    alpha: Optional[float] = option(None, "scale s = alpha / r (scale_by_rank) or alpha; null = the variant's: "
                                          "paper r (s = 1), authors 2")
    scale_by_rank: Optional[bool] = option(None, "s = alpha / r (true) or s = alpha (false, the authors' AwLinear); "
                                                 "variant: paper true, authors false")
    init: Optional[Literal["owsvd", "lora", "authors_svd"]] = option(
        None, "owsvd (SVD of W diag(s)^beta) | lora | authors_svd (their plain SVD with A = first r rows of V); "
              "variant: paper owsvd, authors authors_svd")
    owsvd_beta: float = option(1.0, "beta of the owSVD weighting")
    residual: Optional[bool] = option(None, "W <- W - dW(theta_0): the model is unchanged at init (refused with "
                                            "act_scale batch and an SVD init, where it cannot be); variant: paper "
                                            "true (false with act_scale batch), authors false")
    rank_alloc: bool = option(True, "per-layer ranks from layer importances (water-filling under the budget)")
    rank_importance: Optional[Literal["lod", "act"]] = option(
        None, "lod (outlier fraction) | act (mean first-token output L2 norm); variant: paper lod, authors act")
    rank_rounding: Optional[Literal["greedy", "floor"]] = option(
        None, "integer ranks from the water-filling optimum: greedy | floor; variant: paper greedy, authors floor")
    outlier_threshold: float = option(5.0, "M: an entry is an outlier when |W_jk| n_k > M mean(|W| n)")
    rank_min: int = option(2, "smallest per-layer rank")
    rank_max: Optional[int] = option(None, "largest per-layer rank; variant: paper 32, authors 33 (their "
                                           "max_rank 32 + 1)")
    rank_budget: Optional[float] = option(None, "total sum of (d_in + d_out) r_i; null = the variant's: paper "
                                                "that of uniform rank r, authors 0.7 * 2**20")
    act_scale: Optional[Union[bool, Literal["batch"]]] = option(
        None, "diag(m) from calibrated output |z| (true) | 'batch': the authors' per-batch min-max (not "
              "mergeable) | false; variant: paper true, authors batch")
    act_gamma: float = option(1.0, "gamma: m = (o / mean o)^gamma")
    calibration: Optional[Literal["standard", "authors"]] = option(
        None, "statistics from all few-shot images and prompts without padding (standard) | from the first "
              "augmented training batch and one random class prompt, padding included (authors); "
              "variant: paper standard, authors authors")

    def __post_init__(self):
        super().__post_init__()
        residual_given = self.residual is not None
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.act_scale == "batch" and self.init != "lora" and self.residual:
            # W − ΔW(θ₀) + m̂ ⊙ ΔW(θ₀)x ≠ Wx: a batch-dependent m̂ cannot be taken out of the weight
            if residual_given:
                raise ValueError(f"aira residual=true with act_scale='batch' and init={self.init!r} changes the "
                                 "output at init (the forward scales dW(theta_0) x by the batch's m, the residual "
                                 "removes it unscaled); set residual=false or init='lora'")
            self.residual = False
        positive_int("rank", self.rank)
        positive_int("rank_min", self.rank_min)
        positive_int("rank_max", self.rank_max)
        if self.rank_min > self.rank_max:
            raise ValueError(f"aira needs rank_min <= rank_max, got {self.rank_min} and {self.rank_max}")
        if self.rank_budget is not None and self.rank_budget <= 0:
            raise ValueError(f"aira rank_budget must be positive, got {self.rank_budget}")
        if not self.scale_by_rank and self.alpha is None:
            raise ValueError("aira scale_by_rank=false needs a number for alpha (the scale s = alpha)")

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else self.rank
        return alpha / self.rank if self.scale_by_rank else alpha

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


def check_authors_shape(out_features: int, in_features: int) -> None:
    """The authors' SVD init indexes V as Vᵀ: it needs d_in <= d_out."""
    if in_features > out_features:
        raise ValueError(f"aira init='authors_svd' needs d_in <= d_out (their indexing gives A the wrong "
                         f"shape otherwise); this layer has d_in={in_features}, d_out={out_features}")


def authors_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` as the authors' ``AwLinear`` initialises them (svd_step 1) from the plain SVD of W.

    With ``W = U diag(σ) Vᵀ`` (reduced), ``B = U_r diag(σ_r)`` and ``A`` = the first r *rows* of V,
    i.e. the first r input coordinates of every right singular vector (not ``V_rᵀ``; their code
    indexes ``torch.svd``'s V as if it were Vᵀ). Computed in float32 on the CPU, where their layers
    are built, so the singular vectors' signs are the ones their run gets.
    """
    d_out, d_in = weight.shape
    check_authors_shape(d_out, d_in)
    check_rank_fits("aira", "rank", rank, d_in, d_out)
    w = weight.detach().float().cpu()
    with _single_threaded(w.device):
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    up = u[:, :rank] * sigma[:rank]
    down = vh[:, :rank].t()  # rows of V = Vhᵀ, first r of them
    return up.to(weight.device).contiguous(), down.to(weight.device).contiguous()


def batch_output_scale(base_output: torch.Tensor) -> torch.Tensor:
    """The authors' per-batch output weighting m̂ (``AwLinear.forward``), broadcastable to ``base_output``.

    ``m`` = mean of ``|x Wᵀ + b|`` over the token axis, per sample and output channel (inputs are
    batch first, ``(N, L, d_out)``: the token axis is 1; a 2-D input ``(rows, d_out)`` is averaged over
    its rows); ``m̂ = (m − min m) / (max m − min m)`` with min and max over all of ``m`` (every sample
    and channel of the batch), no epsilon; no gradient flows through it.
    """
    magnitude = base_output.detach().abs()
    magnitude = magnitude.mean(dim=0) if magnitude.dim() == 2 else magnitude.mean(dim=-2, keepdim=True)
    low, high = magnitude.min(), magnitude.max()
    return (magnitude - low) / (high - low)


def layer_importance(linear: nn.Linear, stats, config: AiraConfig) -> float:
    """The importance θ_i of one layer for the rank allocation (``config.rank_importance``)."""
    if config.rank_importance == "lod":
        return outlier_score(linear.weight, stats.input_l2, config.outlier_threshold)
    first_token = stats.first_token_output_l2
    if first_token is None:
        raise ValueError("aira rank_importance='act' needs LayerStats.first_token_output_l2 (calibrate on token "
                         "sequences with collect_activation_stats)")
    return float(first_token)


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
            check_rank_fits("aira", "rank", self.rank, self.in_features, self.out_features)
            col_scale = _need_stats(stats, "init='owsvd'").input_abs_mean
            u, sigma, vt = weighted_svd(weight, self.rank, col_scale, config.owsvd_beta)
            root = sigma.sqrt()
            self.lora_A = nn.Parameter(root[:, None] * vt)
            self.lora_B = nn.Parameter(u * root[None, :])
        elif config.init == "authors_svd":
            up, down = authors_svd_factors(weight, self.rank)
            self.lora_A = nn.Parameter(down)
            self.lora_B = nn.Parameter(up)
        else:
            self.lora_A = nn.Parameter(fan_uniform((self.rank, self.in_features), self.in_features,
                                                   device=weight.device))
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
    def check_fits(cls, config: AiraConfig, out_features: int, in_features: int) -> None:
        if config.init == "authors_svd":
            check_authors_shape(out_features, in_features)
        super().check_fits(config, out_features, in_features)  # the rank, also when rank_alloc would clip it

    @classmethod
    def plan_layers(cls, linears, stats, config: AiraConfig):
        """Per-layer ranks from layer importances (component (b)); ``{}`` when rank_alloc is off."""
        if not config.rank_alloc:
            return {}
        stats = _need_stats(stats, "rank_alloc=True")
        names = list(linears)
        scores = [layer_importance(linears[n], stats[n], config) for n in names]
        costs = [linears[n].in_features + linears[n].out_features for n in names]
        budget = config.rank_budget if config.rank_budget is not None else sum(costs) * config.rank
        ranks = allocate_ranks(scores, costs, budget, config.rank_min, config.rank_max, uniform_rank=config.rank,
                               rounding=config.rank_rounding)
        # a layer has no more than min(d_in, d_out) directions; what a clipped layer leaves is not reassigned
        return {n: {"rank": min(r, linears[n].in_features, linears[n].out_features)} for n, r in zip(names, ranks)}

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.scale * tensors["lora_B"]
        if self.lora_output_scale is not None:  # diag(m) folded into B: no extra per-token work
            up = self.lora_output_scale[:, None] * up
        return up, tensors["lora_A"]

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        out = super().adapter_output(x, base_output)
        if self.config.act_scale == "batch":
            out = out * batch_output_scale(base_output).to(out.dtype)
        return out
