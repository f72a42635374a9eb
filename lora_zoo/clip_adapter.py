"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on frozen CLIP image features.

Facts from their code (gaopengcuhk/CLIP-Adapter ``clip_adapter.py``, a Dassl trainer; notes in
feature_methods.md §2): ``A(f) = ReLU(ReLU(f·W₁ᵀ)·W₂ᵀ)``, two bias-free linear layers ``width → width/4 →
width`` (PyTorch's default init), a ReLU after *both*; the mixed feature ``0.2·A(f) + 0.8·f`` is taken on the
raw feature, then normalised: ``logits = 100·norm(0.2·A(f) + 0.8·f)·norm(t)ᵀ`` with ``t`` the frozen text
features of the class prompts; cross-entropy; the last epoch is tested. Their file hard-codes the width 1024
(RN50); here it is the backbone's embedding width (512 for ViT-B/16).

Their repository has no configuration at all. The recipe is the community ViT-B/16 config
``M-HuangX/LAION-Beyond``, ``FSNL/configs/trainers/CLIP_Adapter/vit_b16_ep200_ctxv1.yaml`` (its trainer is
theirs with width 512): SGD lr 0.01 (momentum 0.9 and L2 weight decay 5e-4, Dassl's defaults), batch 32 with
Dassl's ``drop_last``, 200 epochs, cosine stepped per epoch after one constant warm-up epoch at 1e-5, fp32; the
same SGD 0.01 and batch 32 the LP++ authors list for CLIP-Adapter.

The adapter takes the *normalised* features the head kind serves (``features.py``): the MLP has no bias and
ReLU is positively homogeneous, so ``A(c·f) = c·A(f)`` for ``c > 0`` and ``norm(0.2·A(f) + 0.8·f)`` is the
same for ``f`` and ``f/‖f‖`` — the official arithmetic exactly (tested). What differs: the training images are
``views`` augmented views encoded once (20 by default, each seen 10 times in 200 epochs; their loader draws a
new crop every epoch).

Base-to-new and other datasets: the adapter acts on the image side only, so any class set is scored through it
with its own text features (as CoCoOp evaluates CLIP-Adapter on new classes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .learner import FeatureHead, LearnerConfig, Support
from .options import option
from .registry import register_method
from .scoring import LOGIT_SCALE, ClassSet, text_features


@dataclass
class ClipAdapterConfig(LearnerConfig):
    reduction: int = option(4, "the bottleneck: hidden width = embedding width // reduction (their 4)")
    residual_ratio: float = option(0.2, "the adapter's share of the mixed image feature (their 0.2)")
    views: int = option(20, "augmented views of each training image encoded once; epoch e trains on view e mod "
                            "views (their loader draws a new crop every epoch: views = epochs)")

    def __post_init__(self):
        super().__post_init__()
        if self.reduction < 1 or self.views < 1 or not 0 <= self.residual_ratio <= 1:
            raise ValueError("reduction and views must be >= 1 and residual_ratio within [0, 1]")


def bottleneck(features: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``ReLU(ReLU(f·downᵀ)·upᵀ)``: their ``Adapter`` (two bias-free linear layers, a ReLU after each)."""
    return F.relu(F.relu(features @ down.t()) @ up.t())


# the official repository has no ViT config: the community ViT-B/16 config, M-HuangX/LAION-Beyond
# FSNL/configs/trainers/CLIP_Adapter/vit_b16_ep200_ctxv1.yaml, on Dassl's SGD defaults (momentum 0.9, wd 5e-4)
@register_method("clip_adapter", display_name="CLIP-Adapter", citation="Gao et al., IJCV 2023", lr=0.01,
                 recipe={"optimizer": "sgd", "lr_schedule": "epoch_cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "eta_min": 0.0,
                         "epochs": 200, "batch_size": 32, "weight_decay": 5e-4, "drop_last": True})
class ClipAdapter(FeatureHead):
    """The residual bottleneck MLP on the image features, sized to the backbone's embedding width."""

    config_class = ClipAdapterConfig

    def __init__(self, model: nn.Module, config: ClipAdapterConfig, classes: ClassSet,
                 support: Optional[Support] = None):
        super().__init__(model, config, classes, support)
        width = model.visual.output_dim
        hidden = width // config.reduction
        self.lora_down = nn.Parameter(torch.empty(hidden, width))
        self.lora_up = nn.Parameter(torch.empty(width, hidden))
        for weight in (self.lora_down, self.lora_up):  # nn.Linear's default init, as theirs
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.fixed_classes = True

    @classmethod
    def views(cls, config: ClipAdapterConfig, epochs: int) -> int:
        return max(1, min(config.views, epochs))

    @classmethod
    def check_fits(cls, model: nn.Module, config: ClipAdapterConfig) -> None:
        if model.visual.output_dim // config.reduction < 1:
            raise ValueError(f"clip_adapter's reduction {config.reduction} leaves no hidden unit of the "
                             f"{model.visual.output_dim}-wide image features")

    def class_state(self, model: nn.Module, classes: ClassSet) -> torch.Tensor:
        with torch.no_grad():
            return text_features(model, classes.tokens)

    def logits(self, model: nn.Module, features: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        ratio = self.config.residual_ratio
        mixed = ratio * bottleneck(features, self.lora_down, self.lora_up) + (1 - ratio) * features
        return LOGIT_SCALE * F.normalize(mixed.float(), dim=-1) @ state.float().t()
