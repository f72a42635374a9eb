"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024).

The adapted weight is split into a magnitude and a direction:

    W_eff = m ⊙ (W + s·B A) / ||W + s·B A||_row,

``m ∈ R^{d_out}`` (trainable, initialised to the row norms of W), B and A as in
LoRA (B = 0, so the model is unchanged at init). As in DoRA §4.3 the row norm
is treated as a constant in backward (detached). The unmerged forward never
forms a weight per token: with ``g = m / ||W + s·B A||_row`` (one d_out vector
per step) and x̃ the adapter's (dropped-out) input,

    y = x Wᵀ + bias + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ s·(x̃ Aᵀ) Bᵀ,

the formula of the DoRA authors' code and peft: dropout reaches the magnitude
term too, and the bias is never scaled by g. In training with dropout this
costs one extra ``x̃ Wᵀ``; in eval, or without dropout, x̃ = x and ``x Wᵀ`` is
taken from the base output (minus the bias), so y = g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias.
ΔW depends on the weight it is added to, so ``merge`` keeps the ΔW it merged (a
non-persistent buffer) and ``unmerge`` takes that same ΔW out again (``apply_delta``,
like every method: W comes back to within the rounding of one addition).
Defaults: the CLIP-LoRA preset (DoRA is LoRA plus the magnitude vector).
Trainable parameters per matrix: ``r · (d_in + d_out) + d_out``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .lora import LoraConfig, LoraLinear
from .registry import register_method


# lr 2e-4: DoRA keeps the LoRA hyperparameters of the setting it is compared in (CLIP-LoRA's)
@register_method("dora", display_name="DoRA", citation="Liu et al., ICML 2024", lr=2e-4)
class DoraLinear(LoraLinear):
    config_class = LoraConfig

    def __init__(self, base_layer: nn.Linear, config: LoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        self.lora_magnitude = nn.Parameter(base_layer.weight.detach().float().norm(dim=1))
        # the ΔW merge() added to W (computed against the unmerged W); None while unmerged
        self.register_buffer("lora_merged_delta", None, persistent=False)

    def _frozen_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight if self.lora_merged_delta is None else weight - self.lora_merged_delta.to(weight.dtype)

    def _effective_weight(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        combined = self._frozen_weight().float() + self.scale * (tensors["lora_B"] @ tensors["lora_A"])
        return (tensors["lora_magnitude"] / combined.norm(dim=1).detach())[:, None] * combined

    def _delta(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._effective_weight(tensors) - self._frozen_weight().float()

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        with torch.no_grad():  # the norm is a constant in backward (DoRA §4.3): record nothing for it
            row_norm = (weight.float() + self.scale * (self.lora_B @ self.lora_A)).norm(dim=1)
        gain = (self.lora_magnitude / row_norm).to(x.dtype)
        if self.training and not isinstance(self.dropout, nn.Identity):
            frozen = x @ weight.t().to(x.dtype)  # x̃Wᵀ: x was dropped out, the base output saw the full input
        else:
            frozen = base_output if self.base_layer.bias is None else base_output - self.base_layer.bias.to(x.dtype)
        lora = (x @ self.lora_A.t().to(x.dtype)) @ (self.scale * self.lora_B).t().to(x.dtype)
        # g ⊙ (x̃Wᵀ + s·x̃AᵀBᵀ) − x̃Wᵀ: autograd keeps one d_out-wide tensor per token (for m's gradient), not two
        return gain * (frozen + lora) - frozen

    def original_weight(self) -> torch.Tensor:
        return self._frozen_weight().detach().float()

    def delta(self):
        """Merged, the ΔW that was merged (recomputing it from the merged W would give another one)."""
        merged = self.lora_merged_delta
        return (merged, None) if merged is not None else super().delta()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.lora_merged_delta = self.delta_weight()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self.lora_merged_delta = None
