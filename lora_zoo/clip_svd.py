"""CLIP-SVD (Koleilat, Rivaz & Xiao, "Singular Value Few-shot Adaptation of Vision-Language Models", 2025).

Each adapted weight is written as its full singular value decomposition ``W = U diag(s₀) Vᵀ`` and only the
singular values train: the layer computes ``U diag(s) Vᵀ x + b`` with U and V frozen. Kept as an update of
the frozen weight,

    ΔW = U diag(s − s₀) Vᵀ,

which is exactly zero while s = s₀: the adapted model computes the pretrained function bit for bit, merging
at init leaves W unchanged, and merging, unmerging and the merged export go through ``apply_delta`` like every
method. The official layer (HealthX-Lab/CLIP-SVD, ``svf_utils/svf_torch.py``) replaces W by the product of the
factors instead; the two differ by the SVD's fp32 reconstruction error (up to 3e-6 of max |W| on tiny-clip)
and have the same gradient with respect to s. s₀ is the θ₀ snapshot of the base class's convention
(``lora_s_init``, saved with the adapters), so the frozen weight is W itself and ``decay_to_init`` can pull s
toward s₀ (AdamW's decay otherwise pulls it toward 0, as in the official run). U and Vᵀ are derived from W
again when a layer is built (non-persistent): a column's sign flip in U comes with the same flip in Vᵀ, so ΔW
does not depend on the SVD's signs. Trainable parameters per matrix: ``min(d_in, d_out)``.

The official runs adapt q, k, v, the attention output and both MLP matrices of every block of both towers
(``run_defaults``: targets q,k,v,o,fc1,fc2), with each dataset's CoOp template (template ``dataset``) and the
logit scale fixed at 100; AdamW lr 5e-4, weight decay 0.01, cosine to 1e-6 over 200 × shots iterations,
batch 32. Base-to-new runs use lr 4e-4 and 10 or 20 epochs per dataset: the preset ``clip_svd_b2n``
(docs/METHODS.md, "CLIP-SVD").

Forward: ``F.linear(x, W + ΔW, b)``, forming ΔW once per call (a d_out × d_in product, cheaper than two
full-rank products per token at any batch the protocol uses); with dropout the adapter branch is
``dropout(x) ΔWᵀ``.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import AdapterConfig, AdapterLinear
from .registry import register_method, register_preset
from .svd import weighted_svd

CITATION = "Koleilat, Rivaz & Xiao, arXiv 2025"
ALL_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")
#: datasets their base-to-new configs train for 10 epochs (the others: 20), by our dataset names
TEN_EPOCHS = ("imagenet", "oxford_flowers", "food101", "stanford_cars", "sun397", "ucf101")
#: datasets whose base-to-new config prompts with "a photo of a {}." instead of the CoOp template
PLAIN_PROMPT_B2N = ("dtd", "eurosat", "ucf101")


# lr 5e-4: the official few-shot configs (configs/few_shot/*.yaml); the rest of the recipe is CLIP-LoRA's loop
# (AdamW, weight decay 0.01, cosine to 1e-6 per iteration, batch 32) but 200 iterations per shot
@register_method("clip_svd", display_name="CLIP-SVD", citation=CITATION, lr=5e-4, recipe={"n_iters": 200},
                 run_defaults={"targets": ALL_TARGETS, "template": "dataset"})
class ClipSvdLinear(AdapterLinear):
    config_class = AdapterConfig

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, stats=None):
        super().__init__(base_layer, config, stats)
        rank = min(self.in_features, self.out_features)
        u, sigma, vt = weighted_svd(base_layer.weight, rank, beta=0.0)
        self.register_buffer("lora_U", u, persistent=False)
        self.register_buffer("lora_Vt", vt, persistent=False)
        self.lora_s = nn.Parameter(sigma.clone())
        self.register_buffer("lora_s_init", sigma.clone())  # θ₀: ΔW(θ₀) = 0, so W itself is the residual

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_U * (tensors["lora_s"] - self.lora_s_init)[None, :], self.lora_Vt

    def adapter_output(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_weight().t().to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not isinstance(self.dropout, nn.Identity):
            return super().forward(x)
        weight = self.base_layer.weight
        return F.linear(x, weight + self.delta_weight().to(weight.dtype), self.base_layer.bias)


# base-to-new (their scripts/base2new.sh, configs/base2new/*.yaml): lr 4e-4, 10 or 20 epochs, and "a photo of a
# {}." on DTD, EuroSAT and UCF101; their cosine's period bug (T_max in epochs, stepped per iteration) is not kept
register_preset("clip_svd_b2n", layer="clip_svd", display_name="CLIP-SVD", citation=CITATION, lr=4e-4,
                recipe={"epochs": lambda shots, dataset: 10 if dataset in TEN_EPOCHS else 20},
                run_defaults={"template": lambda shots, dataset: "default" if dataset in PLAIN_PROMPT_B2N
                              else "dataset"})
