"""LP++ (Huang et al., CVPR 2024): a linear probe blended with the text classifier, with data-driven step sizes.

Facts from their code (FereshteShakeri/FewShot-CLIP-Strong-Baseline ``methods/linear_probe_p2.py``,
``methods/utils.py``; notes in feature_methods.md §6), on the normalised support features ``F`` (N × d, one
augmented view of each image) and the normalised text classifier ``T`` (classes × d):

- ``logits = F·Wᵀ + b + α ⊙ (F·Tᵀ)``, a blend vector ``α`` (one weight per class); cross-entropy;
- ``W`` starts at the class *sums* of ``F`` (their division by the counts is commented out), ``b`` at
  ``nn.Linear``'s default ``U(−1/√d, 1/√d)``, every ``α_k`` at ``250 · mean_k mean_{n∈k} (f_n·t_k)``;
- step sizes from the data (a Lipschitz bound): ``W`` and ``b`` by SGD (momentum 0.9, no decay) at
  ``4N / λ_max(FᵀF)``; ``α`` by plain gradient steps of ``N / (4 · max_k Σ_n (f_n·t_k)²)`` every 10 iterations,
  with the gradient **accumulated** since the start (their ``alpha_vec.grad`` is never zeroed);
- 300 full-batch iterations; a new support set per task (here: per seed, as our sampler draws).

What differs, and why: the run's learning rate multiplies their step size (``lr: 1.0`` is theirs exactly;
``optimizer_groups`` in result.json records the step taken); fp32 or the run's autocast (theirs fp16); their
code tests the iteration with the best accuracy on a k-shot validation split (``>=``): here the last iteration
is, as for every method of the zoo; their "full batch" is any batch at least N (65,536 here).

Base-to-new and other datasets: ``W``, ``b`` and ``α`` have rows for the training classes only, so other
classes are scored by the text classifier alone: CLIP's zero-shot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .learner import FeatureHead, LearnerConfig, Support, Task
from .optim import SgdOptions
from .options import option
from .registry import register_method, register_optimizer
from .scoring import LOGIT_SCALE, ClassSet, text_features

FULL_BATCH = 1 << 16  # their full-batch steps: any batch at least the support set (checked before any work)


@dataclass
class LpppConfig(LearnerConfig):
    alpha_every: int = option(10, "iterations between the blend vector's gradient steps (their 10), each with the "
                                  "gradient accumulated since the first iteration")

    def __post_init__(self):
        super().__post_init__()
        if self.alpha_every < 1:
            raise ValueError(f"alpha_every must be >= 1, got {self.alpha_every}")


def weight_step(features: torch.Tensor) -> float:
    """``4N / λ_max(FᵀF)``: their ``calculate_lr_w`` (eigenvalues of the d × d Gram matrix, in float64)."""
    gram = features.double().t() @ features.double()
    return 4 * features.shape[0] / float(torch.linalg.eigvalsh(gram).max())


def blend_step(features: torch.Tensor, text: torch.Tensor) -> float:
    """``N / (4 · max_k Σ_n (f_n·t_k)²)``: their ``calculate_lr_alpha``."""
    return features.shape[0] / (4 * float(((features @ text.t()) ** 2).sum(0).max()))


def initial_blend(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
    """``250 · mean_k mean_{n∈k} (f_n·t_k)``: their ``calculate_init_alpha`` (the ``shots`` factors cancel; a class
    without support images, which their sampler never gives, is left out of the mean)."""
    similarity = (features @ text.t()).double()
    one_hot = F.one_hot(labels, text.shape[0]).double()
    counts = one_hot.sum(0)
    per_class = (one_hot * similarity).sum(0)[counts > 0] / counts[counts > 0]
    return 250 * float(per_class.mean())


# its optimizer builder is registered with the method, not in the recipe: the Lipschitz step is LP++ itself, so it
# stays under --recipe clip_lora too
@register_method("lp_pp", display_name="LP++", citation="Huang et al., CVPR 2024", lr=1.0, optimizer="lp_pp",
                 recipe={"lr_schedule": "constant", "epochs": 300, "batch_size": FULL_BATCH, "weight_decay": 0.0,
                         "drop_last": False})
class LinearProbePP(FeatureHead):
    """The blended linear probe: ``W``, ``b`` and ``α`` of the training classes."""

    config_class = LpppConfig

    def __init__(self, model: nn.Module, config: LpppConfig, classes: ClassSet, support: Optional[Support] = None):
        super().__init__(model, config, classes, support)
        count, width = len(self.class_names), model.visual.output_dim
        self.lora_weight = nn.Parameter(torch.zeros(count, width))
        self.lora_bias = nn.Parameter(torch.empty(count).uniform_(-1 / math.sqrt(width), 1 / math.sqrt(width)))
        self.lora_blend = nn.Parameter(torch.zeros(count))
        self.register_buffer("lora_blend_gradient", torch.zeros(count))  # accumulated, as theirs (a resume too)
        self.register_buffer("lora_steps", torch.zeros((), dtype=torch.long))
        self.weight_step = self.blend_step = None  # from the support (training only)
        self.fixed_classes = True
        if support is not None and classes.tokens is not None:
            with torch.no_grad():
                features, text = F.normalize(support.features[0].float(), dim=-1), text_features(model, classes.tokens)
                self.lora_weight.copy_(F.one_hot(support.labels, count).float().t() @ features)
                self.lora_blend.fill_(initial_blend(features, support.labels, text))
                self.weight_step, self.blend_step = weight_step(features), blend_step(features, text)

    @classmethod
    def views(cls, config: LpppConfig, epochs: int) -> int:
        return 1  # their one augmented pass over the support set

    @classmethod
    def memory_bytes(cls, config: LpppConfig, task: Task) -> int:
        """The support features, the float64 Gram matrix, ``W`` with its gradient and momentum."""
        return super().memory_bytes(config, task) + 8 * task.width ** 2 + 4 * 3 * task.classes * task.width

    @classmethod
    def check_task(cls, model: nn.Module, config: LpppConfig, task: Task) -> None:
        if task.train_images > FULL_BATCH:
            raise ValueError(f"lp_pp trains full-batch on at most {FULL_BATCH} images; this task has "
                             f"{task.train_images}: use fewer shots or classes")
        super().check_task(model, config, task)

    def class_state(self, model: nn.Module, classes: ClassSet):
        with torch.no_grad():
            return text_features(model, classes.tokens), tuple(classes.names) == self.class_names

    def logits(self, model: nn.Module, features: torch.Tensor, state) -> torch.Tensor:
        text, trained = state
        similarity = features.float() @ text.float().t()
        if not trained:  # classes it has no rows for: CLIP's zero-shot logits
            return LOGIT_SCALE * similarity
        return features.float() @ self.lora_weight.t() + self.lora_bias + self.lora_blend * similarity

    def backward(self, losses: dict, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Gradients of the loss; ``α``'s goes to the accumulated sum (unscaled; a step the GradScaler skips adds
        nothing) and ``α`` takes its own step every ``alpha_every`` iterations: the optimizer never steps it."""
        total = sum(losses.values())
        scale(total).backward()
        gradient, self.lora_blend.grad = self.lora_blend.grad, None
        with torch.no_grad():
            if gradient is not None and bool(gradient.isfinite().all()):
                self.lora_blend_gradient += gradient.float() / scale(torch.ones((), device=gradient.device)).float()
            self.lora_steps += 1
            if int(self.lora_steps) % self.config.alpha_every == 0:
                self.lora_blend -= self.blend_step * self.lora_blend_gradient
        return total


@register_optimizer("lp_pp", SgdOptions, algorithm="sgd")
def lipschitz_groups(model: nn.Module, lr: float, weight_decay: float, options=None) -> list[dict]:
    """LP++'s SGD group: ``W``, ``b`` (and ``α``, which its learner steps itself) at ``lr × 4N / λ_max(FᵀF)``."""
    from .learner import attached_learner

    head = attached_learner(model)
    if not isinstance(head, LinearProbePP) or head.weight_step is None:
        raise ValueError("the lp_pp optimizer steps an LP++ head built on its support features (apply_method "
                         "with support=)")
    params = [p for p in (head.lora_weight, head.lora_bias, head.lora_blend) if p.requires_grad]
    return [{"name": f"lp_pp (lr x 4N/lambda_max = {head.weight_step:.4g})", "params": params,
             "lr": lr * head.weight_step, "weight_decay": weight_decay}]
