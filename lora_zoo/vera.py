"""VeRA (Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024).

One pair of frozen random matrices for the whole model, ``A ∈ R^{r×D_in}`` and
``B ∈ R^{D_out×r}``, sized for the largest adapted layer and drawn as peft's VeRA
draws them: a CPU generator seeded with ``projection_seed``, A first, then B, each
Kaiming-uniform with gain √2 over its fan-in (its number of columns), i.e.
``U(−√(6/fan_in), √(6/fan_in))`` (√6 times wider than ``nn.Linear``'s a=√5 init).
Each layer uses the slices ``A[:, :d_in]`` and ``B[:d_out]`` and trains two
vectors, ``d ∈ R^r`` (init 0.1) and ``b ∈ R^{d_out}`` (init 0):

    ΔW = diag(b) B diag(d) A      (no extra scale; b = 0, so the model is unchanged at init).

``plan_layers`` finds the largest dims and hands them to every layer; every
layer then holds the *same* tensor object from a small cache keyed by
(seed, rank, dims, device, dtype) — one tensor per model, also after
``model.to(...)``. The matrices are non-persistent buffers: a checkpoint stores
only b and d, and loading regenerates A and B from the seed. Defaults: r = 256
and d_init = 0.1 (the paper's image-classification setting with ViT-B and its
initialisation), no dropout. Trainable parameters per matrix: ``r + d_out``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .adapter import AdapterConfig, AdapterLinear, fan_uniform, positive_int
from .options import option
from .registry import register_method

_SHARED: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def shared_projections(seed: int, rank: int, max_out: int, max_in: int, device, dtype=torch.float32):
    """The frozen pair ``(A: r×max_in, B: max_out×r)``; the same tensor objects while any holder lives."""
    key = (seed, rank, max_out, max_in, str(torch.device(device)), dtype)
    pair = _SHARED.get(key + ("A",)), _SHARED.get(key + ("B",))
    if pair[0] is None or pair[1] is None:
        generator = torch.Generator().manual_seed(seed)
        # Kaiming-uniform with gain √2 over fan_in = columns: U(−√(6/fan_in), √(6/fan_in)), A then B
        down = fan_uniform((rank, max_in), max_in, math.sqrt(6), generator=generator)
        up = fan_uniform((max_out, rank), rank, math.sqrt(6), generator=generator)
        pair = down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)
        _SHARED[key + ("A",)], _SHARED[key + ("B",)] = pair
    return pair


@dataclass
class VeraConfig(AdapterConfig):
    rank: int = option(256, "rank r of the shared frozen pair")
    d_init: float = option(0.1, "initial value of every entry of d")
    projection_seed: int = option(0, "seed of the shared frozen random pair")
    max_in_features: Optional[int] = option(None, "set by plan_layers: width of the shared A (null: this layer's)")
    max_out_features: Optional[int] = option(None, "set by plan_layers: height of the shared B (null: this layer's)")

    def __post_init__(self):
        super().__post_init__()
        positive_int("rank", self.rank)


# lr 4e-3: VeRA trains its vectors at learning rates far above LoRA's (order 1e-3 .. 1e-2 in the paper's
# appendix); our choice in that range, not tuned on test data
@register_method("vera", display_name="VeRA", citation="Kopiczko, Blankevoort & Asano, ICLR 2024", lr=4e-3)
class VeraLinear(AdapterLinear):
    config_class = VeraConfig
    up_tensors, down_tensors = ("lora_lambda_b",), ("lora_lambda_d",)

    def __init__(self, base_layer: nn.Linear, config: VeraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        self.max_in = config.max_in_features or self.in_features
        self.max_out = config.max_out_features or self.out_features  # at least the layer's: check_fits
        device = base_layer.weight.device
        down, up = shared_projections(config.projection_seed, config.rank, self.max_out, self.max_in, device)
        self.register_buffer("lora_vera_A", down, persistent=False)
        self.register_buffer("lora_vera_B", up, persistent=False)
        self.lora_lambda_d = nn.Parameter(torch.full((config.rank,), float(config.d_init), device=device))
        self.lora_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))

    @classmethod
    def check_fits(cls, config: VeraConfig, out_features: int, in_features: int) -> None:
        """No rank bound from the layer: r is the width of the shared random pair, and ΔW has rank at most
        min(d_in, d_out) whatever r is; the paper trains r above the layer width (r = 1024 on RoBERTa-base's
        768-wide layers: 0.043M parameters = 24 × (768 + 1024)). Only a shared pair planned smaller than the
        layer is refused."""
        max_in, max_out = config.max_in_features or in_features, config.max_out_features or out_features
        if max_in < in_features or max_out < out_features:
            raise ValueError(f"vera shared matrices ({max_out}×{max_in}) are smaller than a "
                             f"{out_features}×{in_features} (d_out×d_in) layer")

    @classmethod
    def plan_layers(cls, linears, stats, config: VeraConfig):
        """Every layer gets the largest in/out dims, so all slice one shared pair."""
        max_in = max(layer.in_features for layer in linears.values())
        max_out = max(layer.out_features for layer in linears.values())
        return {name: {"max_in_features": max_in, "max_out_features": max_out} for name in linears}

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices ``A[:, :d_in]`` and ``B[:d_out]`` of the shared pair."""
        return self.lora_vera_A[:, :self.in_features], self.lora_vera_B[:self.out_features]

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # b is folded into the frozen up slice and d into the down slice once per step (d_out × r and
        # r × d_in values), so autograd keeps rank-r hidden states per token, no d_out-wide copy of the output
        down, up = self.projections()
        return tensors["lora_lambda_b"][:, None] * up, tensors["lora_lambda_d"][:, None] * down

    def _apply(self, fn, recurse=True):
        # a device/dtype move converts each layer's buffer separately; share one converted pair again
        super()._apply(fn, recurse)
        down = self.lora_vera_A
        self.lora_vera_A, self.lora_vera_B = shared_projections(
            self.config.projection_seed, self.config.rank, self.max_out, self.max_in, down.device, down.dtype)
        return self
