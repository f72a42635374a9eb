"""NoRA — Nested Low-Rank Adaptation (Li et al., "Efficient Fine-Tuning of Large Models
via Nested Low-Rank Adaptation", ICCV 2025), as the paper describes it and as the
authors' public code computes it (lliai/LoRA-Zoo, ``nora/``).

``variant="paper"`` (default): frozen outer factors from the truncated SVD of W,
``U_o`` (d_out×r_out) and ``V_oᵀ`` (r_out×d_in); a trainable inner LoRA ``B'``
(r_out×r_in), ``A'`` (r_in×r_out) inside that subspace:

    ΔW = s · U_o B' A' V_oᵀ,   s = α / r_in (α defaults to r_in, so s = 1),

``inner_init`` ``"sigma"`` (paper §3.2: B'A' = diag(σ₁..σ_{r_in}, 0…)), ``"lora"``
or ``"randn"``; ``residual`` (W ← W − ΔW(θ₀), on by default, so the model is
unchanged at init); ``act_weighted`` (decompose W diag(s)^β, un-weight V_oᵀ).
Trainable parameters per matrix: ``2 · r_out · r_in`` (paper eq. 4).

``variant="authors"``: their ``NoRALinear_C`` by default and, through
``sigma_side``, ``inner_structure`` and ``outer_init``, every choice of their
ablation tables A–C (``nora_structures.py``; docs/METHODS.md, "NoRA: the authors'
variant and the ablation tables A–C"): the SVD of ``diag(s) Wᵀ`` with their signs
(``svd.weighted_svd(transposed=True)``), Σ inside the frozen factors, random
inner factors, ``s = α / r_out`` (α = 1), W kept (no residual), and the bias
added a second time, scaled by s (``double_bias``; folded into the bias on merge; off with
``residual``, which could not remove it).

Options whose default differs between the variants default to null and are
resolved from ``VARIANT_DEFAULTS`` when the config is built, so a saved config
holds explicit values. The per-step factors ``up`` (d_out×k) and ``down``
(k×d_in) are formed once, then ``y += (x downᵀ) upᵀ``: a token costs a rank-k LoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Union

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, check_rank_fits, fan_uniform
from .nora_structures import OUTER_A, OUTER_B, STRUCTURES, authors_kaiming, sigma_sides, split_sides
from .options import OptionError, option
from .registry import register_method
from .svd import sign_flips, weighted_svd

#: defaults that differ between the variants: a field left null takes its variant's value
VARIANT_DEFAULTS = {
    "paper": dict(inner_init="sigma", residual=True, act_weighted=False, sigma_side="none", inner_structure="nested",
                  outer_init="svd", double_bias=False, calibration="standard"),
    "authors": dict(inner_init="randn", residual=False, act_weighted=True, sigma_side="input",
                    inner_structure="nested", outer_init="svd", double_bias=True, calibration="authors", alpha=1.0),
}
#: options of the authors' variant that the paper's NoRA has with one value only
PAPER_ONLY = dict(sigma_side="none", inner_structure="nested", outer_init="svd", double_bias=False)
INNER_INITS = {"paper": ("sigma", "lora", "randn"), "authors": ("randn", "kaiming_authors")}
#: structures the authors' table B runs with rank r_out // 2 (table C's ``output`` uses 16)
HALF_RANK = ("down_parallel", "up_parallel")


def resolve_rank(rank: Union[int, float], in_features: int, out_features: int) -> int:
    """An int rank as is; a float in (0, 1] as ``floor(ratio · min(d_in, d_out))`` (at least 1)."""
    resolved = max(1, math.floor(rank * min(in_features, out_features))) if isinstance(rank, float) else rank
    check_rank_fits("nora", "outer_rank", resolved, in_features, out_features)
    return resolved


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
            isinstance(value, float) and value > 1):
        raise OptionError(f"{name} must be a positive int or a ratio in (0, 1], got {value!r}")


@dataclass
class NoraConfig(AdapterConfig):
    variant: Literal["paper", "authors"] = option(
        "paper", "paper: NoRA as the paper describes it; authors: as the authors' code computes it")
    outer_rank: Union[int, float] = option(0.8, "r_out: an int, or a ratio of min(d_in, d_out) (floored)")
    inner_rank: Optional[Union[int, float]] = option(
        None, "r_in: an int, or a ratio of r_out (floored); null: 16, or 0.5 (r_out // 2) where the authors' table B "
              "uses that (up/down_parallel; output with kaiming_authors init); unused by the full and none structures")
    alpha: Optional[float] = option(None, "paper: s = alpha / r_in (null: r_in, s = 1); authors: s = alpha / r_out "
                                          "(null: 1)")
    inner_init: Optional[Literal["sigma", "lora", "randn", "kaiming_authors"]] = option(
        None, "paper: sigma (B'A' = diag(top r_in singular values)) | lora | randn; authors: randn (N(0,1), table C) "
              "| kaiming_authors (table B); null: sigma / randn")
    residual: Optional[bool] = option(None, "W <- W - dW(theta_0), the model unchanged at init (then double_bias "
                                            "defaults to false); null: paper true, authors false")
    act_weighted: Optional[bool] = option(None, "outer SVD of W diag(s)^beta (s: calibrated input mean |x|); null: "
                                                "paper false, authors true")
    act_beta: float = option(1.0, "beta of the activation weighting")
    sigma_side: Optional[Literal["input", "output", "split", "none"]] = option(
        None, "authors: where the singular values sit in the frozen factors U L . R V^T (their init_method; "
              "null: input); paper: none")
    inner_structure: Optional[Literal["nested", "output", "nested_full", "output_full", "down_parallel",
                                      "up_parallel", "none"]] = option(
        None, "authors: where the trainable tensors sit (their Wab_structure / structure; none = table A, the outer "
              "factors trained; null: nested); paper: nested")
    outer_init: Optional[Literal["svd", "kaiming_authors"]] = option(
        None, "authors: svd, or kaiming_authors (their init_method 1 of tables A/B: kaiming down, zero up; "
              "inner_structure up_parallel or none only); paper: svd")
    double_bias: Optional[bool] = option(None, "authors: add scale * bias a second time, as their forward does "
                                               "(folded into the bias on merge; refused with residual true); null: "
                                               "authors true (false with residual true); paper: false")
    calibration: Optional[Literal["standard", "authors"]] = option(
        None, "which data the activation scale s comes from (read by the pipeline): standard (all few-shot "
              "images, class prompts without padding) | authors (one augmented batch, one prompt with padding); "
              "null: the variant's")

    def __post_init__(self):
        super().__post_init__()
        given = {name for name in VARIANT_DEFAULTS[self.variant] if getattr(self, name) is not None}
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if name not in given:
                setattr(self, name, value)
        if self.variant == "paper":
            for name, value in PAPER_ONLY.items():
                if getattr(self, name) != value:
                    raise OptionError(f"{name}={getattr(self, name)!r} exists only for variant='authors' "
                                      f"(the paper's NoRA has {name}={value!r})")
        if self.residual and self.double_bias:
            # W − ΔW(θ₀) leaves the extra scale·b in the output at init; removing it from the frozen bias as
            # well would cancel it for good, i.e. compute exactly what double_bias=false computes
            if "double_bias" in given:
                raise OptionError("nora residual=true with double_bias=true changes the output at init by "
                                  "scale * bias (the residual removes dW(theta_0) only); set one of them false")
            self.double_bias = False
        if self.outer_init == "kaiming_authors":
            self._resolve_kaiming_outer(given)
        self._resolve_inner(STRUCTURES[self.inner_structure], given)
        _check_rank("outer_rank", self.outer_rank)

    def _resolve_kaiming_outer(self, given: set) -> None:
        if self.inner_structure not in ("up_parallel", "none"):
            raise OptionError(f"inner_structure={self.inner_structure!r} with outer_init='kaiming_authors' never "
                              "trains (the frozen zero up factor makes dW and its gradient 0; the authors' table B "
                              "init 1); use up_parallel or none")
        for name, meaningless in (("sigma_side", "none"), ("act_weighted", False)):  # no SVD: nothing to place
            if name in given and getattr(self, name) != meaningless:
                raise OptionError(f"{name}={getattr(self, name)!r} has no meaning with outer_init='kaiming_authors' "
                                  f"(no SVD); leave it null or {meaningless!r}")
            setattr(self, name, meaningless)

    def _resolve_inner(self, structure, given: set) -> None:
        if structure.name == "none":
            if "inner_init" in given:
                raise OptionError(f"inner_init={self.inner_init!r} has no meaning with inner_structure='none' "
                                  "(table A trains the outer factors; no inner tensors); leave it null")
            self.inner_init = None
        elif self.inner_init not in INNER_INITS[self.variant]:
            raise OptionError(f"inner_init={self.inner_init!r} is not one of variant={self.variant!r}'s: "
                              f"{', '.join(INNER_INITS[self.variant])}")
        if not structure.uses_inner_rank:
            if self.inner_rank is not None:
                raise OptionError(f"inner_rank has no meaning with inner_structure={structure.name!r} "
                                  f"({structure.authors}: no rank-r_in pair); leave it null")
            return
        if self.inner_rank is None:
            half = structure.name in HALF_RANK or (structure.name == "output" and self.inner_init == "kaiming_authors")
            self.inner_rank = 0.5 if half else 16
        _check_rank("inner_rank", self.inner_rank)

    @property
    def needs_calibration(self) -> bool:
        return self.act_weighted and self.outer_init == "svd"


# lr 1e-3: the authors swept 1e-3 .. 1e-2 for NoRA (their W&B grids); the low end, not tuned on a test split
@register_method("nora", display_name="NoRA", citation="Li et al., ICCV 2025", lr=1e-3)
class NoraLinear(AdapterLinear):
    config_class = NoraConfig
    up_tensors, down_tensors = ("lora_inner_B",), ("lora_inner_A",)

    def __init__(self, base_layer: nn.Linear, config: NoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        d_out, d_in = self.out_features, self.in_features
        self.structure = STRUCTURES[config.inner_structure]
        self.outer_rank, self.inner_rank = self.resolve_ranks(config, d_out, d_in)
        if config.variant == "paper":
            self.scale = (config.alpha if config.alpha is not None else self.inner_rank) / self.inner_rank
        else:
            self.scale = config.alpha / self.outer_rank
        outer_P, outer_Q, sigma, signs = self._outer_factors(config, stats)
        shapes = self.structure.shapes(d_out, d_in, self.outer_rank, self.inner_rank)
        self.up_tensors, self.down_tensors = split_sides(shapes)
        if self.structure.name == "none":  # table A: the outer factors themselves are trained
            initial = {OUTER_B: outer_P, OUTER_A: outer_Q}
        else:
            # frozen: rebuilt from W when a checkpoint loads, except what W cannot give again (saved:
            # the kaiming_authors draw, and the SVD's signs on this machine, applied to canonical factors)
            self.register_buffer("lora_outer_P", outer_P, persistent=False)
            self.register_buffer("lora_outer_Q", outer_Q, persistent=config.outer_init != "svd")
            if signs is not None:
                self.register_buffer("lora_outer_signs", signs)
            initial = self._initial_inner(shapes, sigma, config.inner_init, base_layer.weight)
        for name, tensor in initial.items():
            setattr(self, name, nn.Parameter(tensor.contiguous()))
        if config.double_bias and base_layer.bias is not None:
            # the bias as built: Δb = scale·b whatever the base bias holds (merged, it holds (1 + scale)·b)
            self.register_buffer("lora_base_bias", base_layer.bias.detach().clone(), persistent=False)
        if config.residual:
            self._make_residual()

    @staticmethod
    def resolve_ranks(config: NoraConfig, out_features: int, in_features: int) -> tuple[int, Optional[int]]:
        """``(r_out, r_in)`` of a ``out_features × in_features`` layer; a one-line error when they do not fit it."""
        outer = resolve_rank(config.outer_rank, in_features, out_features)
        ratio = config.inner_rank  # an int as is, a ratio of r_out floored (at least 1); None: no inner pair
        inner = max(1, math.floor(ratio * outer)) if isinstance(ratio, float) else ratio
        if config.variant == "paper" and inner > outer:
            raise ValueError(f"nora inner_rank {inner} exceeds outer_rank {outer} of a {out_features}×{in_features} "
                             "(d_out×d_in) layer")
        return outer, inner

    @classmethod
    def check_fits(cls, config: NoraConfig, out_features: int, in_features: int) -> None:
        cls.resolve_ranks(config, out_features, in_features)

    def _outer_factors(self, config: NoraConfig, stats):
        """``(P, Q, Σ, signs)``: P (d_out×r_out), Q (r_out×d_in), the singular values (None without SVD) and,
        for the authors' SVD convention, the column signs it gave relative to canonical ones (then P and Q
        are returned canonical: the layer applies the signs)."""
        weight, r_out = self.base_layer.weight, self.outer_rank
        if config.outer_init == "kaiming_authors":  # their lora_B = 0, lora_A kaiming(a=√5) on (d_in × r)
            return (torch.zeros(self.out_features, r_out, device=weight.device),
                    fan_uniform((r_out, self.in_features), r_out, device=weight.device), None, None)
        col_scale = None
        if config.act_weighted:
            if stats is None:
                raise ValueError("nora with act_weighted=True needs calibration stats (collect_activation_stats)")
            col_scale = stats.input_abs_mean
        authors = config.variant == "authors"
        u, sigma, vt = weighted_svd(weight, r_out, col_scale, config.act_beta, transposed=authors)
        left, right = sigma_sides(sigma, config.sigma_side)
        outer_P, outer_Q = u * left, right[:, None] * vt
        if not authors or self.structure.name == "none":
            return outer_P.contiguous(), outer_Q.contiguous(), sigma, None
        flips = sign_flips(u)[0]
        return (outer_P * flips).contiguous(), (flips[:, None] * outer_Q).contiguous(), sigma, flips

    def _frozen_outer(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(P, Q)`` with the recorded SVD signs applied; ``(None, None)`` for table A (nothing frozen)."""
        if self.structure.name == "none":
            return None, None
        signs = getattr(self, "lora_outer_signs", None)
        if signs is None:
            return self.lora_outer_P, self.lora_outer_Q
        return self.lora_outer_P * signs, signs[:, None] * self.lora_outer_Q

    def _initial_inner(self, shapes, sigma, how: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        if how == "kaiming_authors":
            return authors_kaiming(shapes, like)
        if how == "randn":
            return {name: torch.randn(shape, device=like.device) for name, (shape, _) in shapes.items()}
        r_out, r_in = self.outer_rank, self.inner_rank  # the paper's nested pair
        if how == "sigma":  # B' = sqrt(diag Σ_o)[:, :r_in], A' = sqrt(diag Σ_o)[:r_in, :]
            root = torch.diag(sigma.sqrt())
            return {"lora_inner_B": root[:, :r_in].clone(), "lora_inner_A": root[:r_in, :].clone()}
        return {"lora_inner_B": torch.zeros(r_out, r_in, device=like.device),
                "lora_inner_A": fan_uniform((r_in, r_out), r_out, device=like.device)}

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        outer_P, outer_Q = self._frozen_outer()
        up, down = self.structure.factors(outer_P, outer_Q, tensors)
        return self.scale * up, down

    # ---- the authors' double bias: y = x (W + ΔW)ᵀ + (1 + scale)·b, merged or not --------------
    def extra_bias(self) -> Optional[torch.Tensor]:
        """``scale · b`` when ``double_bias`` (their forward adds the bias again in the adapter branch): the base
        class adds it to the unmerged output, folds it into the bias on merge and takes it out on unmerge."""
        bias = getattr(self, "lora_base_bias", None)
        return None if bias is None else self.scale * bias
