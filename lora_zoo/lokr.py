"""LoKr — the Kronecker-product adapter of LyCORIS (Yeh et al., "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024), as Hugging Face peft's ``LoKrConfig`` computes it; the NoRA
paper's Table 1 compares against it.

Each side of a ``d_out × d_in`` weight is factored into the divisor pair closest to its square root
(``factorization``: 4096 → 64·64, 11008 → 86·128; with ``decompose_factor`` f > 0 dividing the side, f·(side/f)),
``d_out = out_l·out_k`` and ``d_in = in_m·in_n``, and

    ΔW = s · kron(w1, w2),   w1 ∈ R^{out_l×in_m} (small),  w2 ∈ R^{out_k×in_n} (large),   s = α / r.

The large factor is low-rank, ``w2 = w2_a w2_b`` (``out_k×r``, ``r×in_n``), unless ``r ≥ max(out_k, in_n)/2``,
where it is a full matrix; the small one is full unless ``decompose_both`` and ``r < max(out_l, in_m)/2``. These are
peft's rules (peft 0.21, ``tuners/lokr/layer.py``), so a layer here and peft's LoKr layer of the same shape, r and α
hold the same tensors, and ``lokr`` exports to a stock peft LoKr adapter (``peft_export.py``). Init as peft's default
(``init_weights=True``): w1 (or w1_a) zeros, the others Kaiming-uniform, so the model is unchanged at init;
``init="lycoris"`` zeroes w2 (or w2_b) instead and draws w1. Drawn in peft's order from torch's generator.

The unmerged forward never forms ΔW: with ``x`` reshaped to ``in_m × in_n`` per token,
``kron(w1, w2) x = vec(w1 · X · w2ᵀ)`` (two small products per token; peft builds the ``d_out × d_in`` ΔW at
every call). peft's ``rank_dropout`` and ``module_dropout`` (0 by default) are not implemented; ``dropout`` drops the
adapter's input as for every method here (0 by default, as LoKr has none).
Trainable parameters per matrix: the sizes of the tensors above (``tests/method_cases.py``, ``lokr_count``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, fan_uniform, positive_int
from .options import option
from .registry import register_method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension``: ``factor`` and ``dimension / factor`` when ``factor > 0`` divides it (in
    that order), else the divisor pair with the smallest sum whose smaller part is at most ``factor`` (any, for -1),
    smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    small, large = 1, dimension
    for candidate in range(2, int(dimension ** 0.5) + 1):
        if candidate > limit:
            break
        if dimension % candidate == 0:
            small, large = candidate, dimension // candidate
    return small, large


@dataclass
class LokrConfig(AdapterConfig):
    rank: int = option(8, "r: the rank of the low-rank factor(s); the scale is alpha / r")
    alpha: float = option(8.0, "scale numerator: s = alpha / r (peft's LoKr default 8)")
    decompose_both: bool = option(False, "also factor the small Kronecker factor w1 into rank-r factors")
    decompose_factor: int = option(-1, "factor each side into this number and the rest when it divides the side; "
                                       "-1: the divisor pair closest to the square root")
    init: Literal["peft", "lycoris"] = option("peft", "peft: w1 zeros (peft's default init_weights=true); lycoris: "
                                                      "w2 zeros (init_weights='lycoris'); both start at dW = 0")

    def __post_init__(self):
        super().__post_init__()
        positive_int("rank", self.rank)
        if self.decompose_factor != -1:
            positive_int("decompose_factor", self.decompose_factor)


# lr 3e-4: LLM-Adapters' learning rate for its low-rank adapters (finetune.py), the Table 1 protocol
@register_method("lokr", display_name="LoKr", citation="Yeh et al., ICLR 2024 (LyCORIS); peft's LoKr", lr=3e-4)
class LokrLinear(AdapterLinear):
    """``ΔW = s · kron(w1, w2)`` with peft LoKr's factor shapes and tensors (``lora_w1``, ``lora_w2_a``, ...)."""

    config_class = LokrConfig
    up_tensors, down_tensors = ("lora_w1", "lora_w1_a", "lora_w2", "lora_w2_a"), ("lora_w1_b", "lora_w2_b")

    def __init__(self, base_layer: nn.Linear, config: LokrConfig, stats=None):
        super().__init__(base_layer, config, stats)
        device = base_layer.weight.device
        self.out_l, self.out_k = factorization(self.out_features, config.decompose_factor)
        self.in_m, self.in_n = factorization(self.in_features, config.decompose_factor)
        self.scale = config.alpha / config.rank
        r = config.rank
        full_w1 = not (config.decompose_both and r < max(self.out_l, self.in_m) / 2)
        full_w2 = not r < max(self.out_k, self.in_n) / 2
        shapes = ({"lora_w1": (self.out_l, self.in_m)} if full_w1
                  else {"lora_w1_a": (self.out_l, r), "lora_w1_b": (r, self.in_m)})
        shapes.update({"lora_w2": (self.out_k, self.in_n)} if full_w2
                      else {"lora_w2_a": (self.out_k, r), "lora_w2_b": (r, self.in_n)})
        zero = {"peft": ("lora_w1", "lora_w1_a"), "lycoris": ("lora_w2", "lora_w2_b")}[config.init]
        for name, shape in shapes.items():  # peft's order of draws: w1 side, then w2 side (a before b)
            tensor = torch.zeros(shape, device=device) if name in zero else fan_uniform(shape, shape[1], device=device)
            setattr(self, name, nn.Parameter(tensor))

    @staticmethod
    def _factor(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        return tensors[name] if name in tensors else tensors[name + "_a"] @ tensors[name + "_b"]

    def kron_factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` as full matrices (the scale not applied)."""
        return self._factor(tensors, "lora_w1"), self._factor(tensors, "lora_w2")

    def _delta(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w1, w2 = self.kron_factors(tensors)
        return self.scale * torch.kron(w1, w2)

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        tensors = self.trainable_tensors()
        w1 = self._factor(tensors, "lora_w1").to(x.dtype)
        blocks = x.reshape(*x.shape[:-1], self.in_m, self.in_n)
        if "lora_w2" in tensors:
            right = blocks @ tensors["lora_w2"].t().to(x.dtype)                        # (..., in_m, out_k)
        else:
            right = (blocks @ tensors["lora_w2_b"].t().to(x.dtype)) @ tensors["lora_w2_a"].t().to(x.dtype)
        out = torch.matmul(w1, right) * self.scale                                     # (..., out_l, out_k)
        return out.reshape(*x.shape[:-1], self.out_features)

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` with ``up @ down = ΔW`` exactly: ``kron(w1, w2_a w2_b) = kron(w1, w2_a) · kron(I, w2_b)``
        (rank ``in_m · r``; with a full w2, ``kron(w1, w2) · I``). For code that needs a product; the forward and
        the peft export use the Kronecker factors themselves."""
        w1 = self._factor(tensors, "lora_w1")
        if "lora_w2" in tensors:
            return self.scale * torch.kron(w1, tensors["lora_w2"]), torch.eye(self.in_features, device=w1.device)
        eye = torch.eye(self.in_m, device=w1.device, dtype=w1.dtype)
        return self.scale * torch.kron(w1, tensors["lora_w2_a"]), torch.kron(eye, tensors["lora_w2_b"])
