"""TaskRes (Yu et al., CVPR 2023): the text classifier plus a learned task residual, on frozen image features.

Facts from their code (geekyutao/TaskRes ``trainers/taskres.py``, ``configs/trainers/TaskRes/``,
``train_regular.sh``; notes in feature_methods.md §3):

- the base classifier is the *raw* (unnormalised) text embedding of each class prompt (their mean over templates
  without normalisation; one template but ImageNet's eight); the residual ``x`` (classes × width) starts at zero
  and is added **before** normalisation: ``logits = 100·norm(f)·norm(t + α·x)ᵀ``;
- α (RESIDUAL_SCALE) is 0.5 for every dataset but Flowers (1.0), fixed, not learned;
- their only ViT-B/16 config (``adam_lr2e-4_B256_ep200_ViT16``): Dassl's Adam (lr 2e-4, L2 weight decay 5e-4 into
  the gradient, betas 0.9/0.999), batch 256 with Dassl's ``drop_last``, 200 epochs, cosine stepped per epoch after
  one constant warm-up epoch at 1e-5; the last epoch is tested.

What differs, and why: the training images are ``views`` augmented views encoded once (``features.py``; 20 by
default: each view is seen 10 times in 200 epochs, where their loader draws a new crop every epoch; 10× less
encoding, and 20 × N × width fp32 features in memory: 0.66 GB for 16-shot ImageNet with ViT-B/16); the prompts
are the run's template with "_" read as a space (they keep underscores); the base is encoded in the run's
precision (theirs fp16, then upcast).

Base-to-new and other datasets: the residual has rows for the training classes only (their code has no protocol
for unseen classes), so other classes are scored by the text classifier alone: CLIP's zero-shot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .learner import FeatureHead, LearnerConfig, Support
from .options import option
from .registry import register_method
from .scoring import LOGIT_SCALE, ClassSet
from .text import encode_text

#: their train_regular.sh: RESIDUAL_SCALE 1.0 for OxfordFlowers, 0.5 for every other dataset
RESIDUAL_SCALES = {"oxford_flowers": 1.0}
DEFAULT_SCALE = 0.5


@dataclass
class TaskResConfig(LearnerConfig):
    residual_scale: Optional[float] = option(None, "alpha, the residual's fixed scale (null: 1.0 on oxford_flowers, "
                                                   "0.5 elsewhere, as their scripts; adapters.json records it)")
    views: int = option(20, "augmented views of each training image encoded once; epoch e trains on view e mod "
                            "views (their loader draws a new crop every epoch: views = epochs)")

    def __post_init__(self):
        super().__post_init__()
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")


class TextBase:
    """The raw text embeddings of a class set, encoded once (without gradients) and kept while the classes and the
    autocast setting are the same: the frozen text tower's output does not change during a run."""

    def __init__(self):
        self.tokens, self.setting, self.features = None, None, None

    def __call__(self, model: nn.Module, classes: ClassSet) -> torch.Tensor:
        device = classes.tokens.device.type
        setting = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if (self.tokens is None or setting != self.setting or self.tokens.shape != classes.tokens.shape
                or not torch.equal(self.tokens, classes.tokens)):
            with torch.no_grad():
                self.features = encode_text(model, classes.tokens).float()
                self.tokens, self.setting = classes.tokens.clone(), setting
        return self.features


# their only ViT-B/16 config, configs/trainers/TaskRes/adam_lr2e-4_B256_ep200_ViT16.yaml, on Dassl's defaults
@register_method("taskres", display_name="TaskRes", citation="Yu et al., CVPR 2023", lr=2e-4,
                 recipe={"optimizer": "adam", "lr_schedule": "epoch_cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "eta_min": 0.0,
                         "epochs": 200, "batch_size": 256, "weight_decay": 5e-4, "drop_last": True})
class TaskRes(FeatureHead):
    """A zero-initialised residual on the raw text embeddings of the training classes."""

    config_class = TaskResConfig

    def __init__(self, model: nn.Module, config: TaskResConfig, classes: ClassSet,
                 support: Optional[Support] = None, residual_scale: Optional[float] = None):
        super().__init__(model, config, classes, support)
        resolved = RESIDUAL_SCALES.get(classes.dataset, DEFAULT_SCALE)
        self.residual_scale = float(residual_scale if residual_scale is not None else
                                    config.residual_scale if config.residual_scale is not None else resolved)
        self.lora_residual = nn.Parameter(torch.zeros(len(self.class_names), model.text_projection.shape[1]))
        self.base = TextBase()

    @classmethod
    def views(cls, config: TaskResConfig, epochs: int) -> int:
        return max(1, min(config.views, epochs))

    def record(self) -> dict[str, Any]:
        return {"classes": list(self.class_names), "residual_scale": self.residual_scale}

    @classmethod
    def rebuild(cls, model: nn.Module, config: TaskResConfig, record) -> "TaskRes":
        return cls(model, config, ClassSet(tuple(record["classes"])), residual_scale=record["residual_scale"])

    def class_state(self, model: nn.Module, classes: ClassSet) -> torch.Tensor:
        """``norm(t + α·x)`` for the training classes, ``norm(t)`` (no residual) for any other class set."""
        base = self.base(model, classes)
        if tuple(classes.names) != self.class_names:
            return F.normalize(base, dim=-1)
        return F.normalize(base + self.residual_scale * self.lora_residual, dim=-1)

    def logits(self, model: nn.Module, features: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * features.float() @ state.float().t()
