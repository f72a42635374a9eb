"""NoRA — Nested Low-Rank Adaptation (Li et al., "Efficient Fine-Tuning of Large Models
via Nested Low-Rank Adaptation", ICCV 2025).

Frozen outer factors from the truncated SVD of W, ``U_o`` (d_out×r_out) and
``V_oᵀ`` (r_out×d_in); a trainable inner LoRA ``B'`` (r_out×r_in), ``A'``
(r_in×r_out) inside that subspace:

    ΔW = s · U_o B' A' V_oᵀ,   s = α / r_in (α defaults to r_in, so s = 1).

Options (METHODS.md, "NoRA"): ``outer_rank`` as an int or a ratio of
min(d_in, d_out) (default 0.8, floored); ``inner_rank`` (16); ``inner_init``
``"sigma"`` (paper §3.2: B'A' = diag(σ₁..σ_{r_in}, 0…)), ``"lora"`` or ``"randn"``
(the authors' code); ``residual`` (W ← W − ΔW(θ₀), on by default, so the model is
unchanged at init); ``act_weighted`` (decompose W diag(s)^β, un-weight V_oᵀ).
Forward: per step ``P = U_o B'`` and ``Q = A' V_oᵀ`` are formed once, then
``y += s · (x Qᵀ) Pᵀ`` — the per-token cost of a rank-r_in LoRA.
Trainable parameters per matrix: ``2 · r_out · r_in`` (paper eq. 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, positive_int
from .lora import kaiming_rows
from .options import option
from .registry import register_method
from .svd import weighted_svd


def resolve_rank(rank: Union[int, float], in_features: int, out_features: int) -> int:
    """An int rank as is; a float in (0, 1] as ``floor(ratio · min(d_in, d_out))`` (at least 1)."""
    full = min(in_features, out_features)
    if isinstance(rank, float):
        resolved = max(1, math.floor(rank * full))
    else:
        resolved = rank
    if not 1 <= resolved <= full:
        raise ValueError(f"outer rank {rank!r} resolves to {resolved}, outside [1, {full}] for a {out_features}×{in_features} layer")
    return resolved


@dataclass
class NoraConfig(AdapterConfig):
    outer_rank: Union[int, float] = option(0.8, "r_out: an int, or a ratio of min(d_in, d_out) (floored)")
    inner_rank: int = option(16, "r_in, the rank of the trainable inner factors B' A'")
    alpha: Optional[float] = option(None, "scale s = alpha / r_in; null = r_in (s = 1)")
    inner_init: Literal["sigma", "lora", "randn"] = option("sigma", "sigma (paper: B'A' = diag(top r_in singular values)) | lora | randn")
    residual: bool = option(True, "W <- W - dW(theta_0): the model is unchanged at init")
    act_weighted: bool = option(False, "outer SVD of W diag(s)^beta (s: calibrated input mean |x|)")
    act_beta: float = option(1.0, "beta of the activation weighting")

    def __post_init__(self):
        super().__post_init__()
        positive_int("inner_rank", self.inner_rank)
        if isinstance(self.outer_rank, bool) or not isinstance(self.outer_rank, (int, float)):
            raise ValueError(f"outer_rank must be an int or a ratio in (0, 1], got {self.outer_rank!r}")
        if isinstance(self.outer_rank, float) and not 0 < self.outer_rank <= 1:
            raise ValueError(f"outer_rank as a ratio must be in (0, 1], got {self.outer_rank}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.inner_rank) / self.inner_rank

    @property
    def needs_calibration(self) -> bool:
        return self.act_weighted


# lr 1e-3: the authors swept 1e-3 .. 1e-2 for NoRA (their W&B grids); the low end, not tuned on a test split
@register_method("nora", display_name="NoRA", citation="Li et al., ICCV 2025", lr=1e-3)
class NoraLinear(AdapterLinear):
    config_class = NoraConfig
    up_tensors, down_tensors = ("lora_inner_B",), ("lora_inner_A",)

    def __init__(self, base_layer: nn.Linear, config: NoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        self.outer_rank = resolve_rank(config.outer_rank, self.in_features, self.out_features)
        self.inner_rank = config.inner_rank
        if self.inner_rank > self.outer_rank:
            raise ValueError(f"inner_rank {self.inner_rank} exceeds outer_rank {self.outer_rank}")
        self.scale = config.scale
        col_scale = None
        if config.act_weighted:
            if stats is None:
                raise ValueError("nora with act_weighted=True needs calibration stats (collect_activation_stats)")
            col_scale = stats.input_abs_mean
        u, sigma, vt = weighted_svd(base_layer.weight, self.outer_rank, col_scale, config.act_beta)
        # frozen, derived again from W (and the stats) whenever the layer is built
        self.register_buffer("lora_outer_U", u, persistent=False)
        self.register_buffer("lora_outer_Vt", vt, persistent=False)
        inner_B, inner_A = self._initial_inner(sigma, config.inner_init)
        self.lora_inner_B = nn.Parameter(inner_B)
        self.lora_inner_A = nn.Parameter(inner_A)
        if config.residual:
            self._make_residual()

    def _initial_inner(self, sigma: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
        r_out, r_in, device = self.outer_rank, self.inner_rank, sigma.device
        if how == "sigma":  # B' = sqrt(diag Σ_o)[:, :r_in], A' = sqrt(diag Σ_o)[:r_in, :]
            root = torch.diag(sigma.sqrt())
            return root[:, :r_in].clone(), root[:r_in, :].clone()
        if how == "lora":
            return torch.zeros(r_out, r_in, device=device), kaiming_rows(r_in, r_out, sigma)
        return torch.randn(r_out, r_in, device=device), torch.randn(r_in, r_out, device=device)

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.scale * (self.lora_outer_U @ tensors["lora_inner_B"])  # s·P = s·U_o B' (d_out × r_in)
        down = tensors["lora_inner_A"] @ self.lora_outer_Vt                # Q = A' V_oᵀ     (r_in × d_in)
        return up, down
