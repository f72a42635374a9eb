"""2SFS — two-stage few-shot adaptation (Farina, Mancini, Iacca & Ricci, "Rethinking Few-Shot Adaptation of
Vision-Language Models in Two Stages", CVPR 2025; FarinaMatteo/rethinking_fewshot_vlms, ``fs/twostage.py``).

Stage 1 trains the LayerNorms of both towers with CLIP's own classifier: ``logit_scale.exp() · cos(image,
text_c)`` over the class prompts, text features recomputed every step. Stage 2 freezes everything and trains a
linear head, one row per training class, initialised at the switch from the normalised text features of the
class prompts as the stage-1 encoder computes them: ``logit_scale.exp() · cos(image, head_c)``, the image
tower run without gradients. The switch comes after ``int(first_stage × iterations)`` iterations (0.6 of
300 × shots), where a new part of the run starts (``TwoStageHooks.restarts``): the cosine from the base lr
again and a fresh optimizer state, as their second optimizer and scheduler are. Classes the head was not trained on (base-to-new's new classes, another dataset's
with ``--eval_on``) are scored with fresh text features of the tuned encoder, the trained ones with their rows.

Which LayerNorms: ``ln_1`` and ``ln_2`` of every residual block of both towers. Their selection code also lists
``ln_pre``, ``ln_post`` and ``ln_final`` but sets them back to frozen (``fs/utils/model_utils.py``), so those
are what their runs train (61,440 values on ViT-B/16). The learner owns trainable copies of each one's weight
and bias (``lora_``-named, in ``norms``); the model's LayerNorm is wrapped by a ``TunedNorm`` that computes
with those copies and keeps the original as ``base_layer``, untouched. The stage is a saved tensor
(``lora_stage``: 1, then 2), so a checkpoint or a resumed run knows it; during training the hooks also tell
the learner the stage of each step on the host (no device sync per step).

Recipe: AdamW lr 2e-4, weight decay 1e-2 (on the LayerNorm weights, toward 0, as theirs), batch 32, cosine to
1e-6 per iteration in each stage, 300 × shots iterations in all, prompts "a photo of a {}." for every dataset.
A step the GradScaler skips counts as an iteration here (theirs repeats it); the head's initial text features
are computed in fp32 (theirs under fp16 autocast).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import TrainingHooks
from .learner import LearnerConfig, TensorLearner, attached_learner
from .options import OptionError, Options, option
from .registry import register_method
from .scoring import ClassSet, text_features

CITATION = "Farina, Mancini, Iacca & Ricci, CVPR 2025"
TOWERS = ("vision", "text")
NORMS = ("ln_1", "ln_2")


@dataclass
class TwoStageOptions(Options):
    """When the stages switch (the schedule's option: it changes how the learner trains, not what it computes)."""

    first_stage: float = option(0.6, "fraction of the iterations that train the LayerNorms (stage 1); the head "
                                     "trains from iteration int(fraction x iterations) on")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.first_stage <= 1.0:
            raise OptionError(f"first_stage must be in [0, 1], got {self.first_stage}")


class NormCopy(nn.Module):
    """The learner's trainable copy of one LayerNorm's weight and bias."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.lora_weight = nn.Parameter(norm.weight.detach().float().clone())
        self.lora_bias = nn.Parameter(norm.bias.detach().float().clone())


class TunedNorm(nn.Module):
    """A LayerNorm of the backbone computed with the learner's copies of its tensors (the original: ``base_layer``)."""

    def __init__(self, base_layer: nn.LayerNorm, tensors: NormCopy):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "tensors", tensors)  # registered in the learner, which owns it, not here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors.lora_weight, self.tensors.lora_bias
        norm = self.base_layer
        return F.layer_norm(x.to(weight.dtype), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


def block_norms(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(block, attribute, qualified name)`` of ``ln_1`` and ``ln_2`` in every block of both towers."""
    from .attention import encoder_blocks  # here: attention loads open_clip, which a method lookup must not

    found = []
    for tower in TOWERS:
        prefix, blocks = encoder_blocks(model, tower)
        found += [(block, attr, f"{prefix}.{i}.{attr}") for i, block in enumerate(blocks) for attr in NORMS]
    return found


class Classifier(NamedTuple):
    """The class side of one step or one evaluation: unit-norm rows, and whether they are the stage-2 head's."""

    rows: torch.Tensor
    second_stage: bool


class TwoStageHooks(TrainingHooks):
    """Switches the learner to stage 2 at ``int(first_stage × iterations)``, where a new part of the run starts."""

    options_class = TwoStageOptions

    def __init__(self, model: nn.Module, total_steps: int, seed: int, options: Optional[TwoStageOptions]):
        self.model, self.learner = model, attached_learner(model)
        self.switch = int((options or TwoStageOptions()).first_stage * total_steps)

    def before_forward(self, step: int) -> None:
        if step == self.switch:
            self.learner.start_second_stage(self.model)
        self.learner.step_stage = 2 if step >= self.switch else 1

    def restarts(self) -> tuple[int, ...]:
        return (self.switch,)

    def finish(self) -> None:
        self.learner.step_stage = None  # from now on its saved stage says

    def summary(self) -> dict:
        return {"twostage_head_from_iteration": self.switch}


# lr 2e-4, 300 iterations per shot: their main.py defaults, which the paper uses for every dataset and shot count
@register_method("twostage", display_name="2SFS", citation=CITATION, lr=2e-4, hooks=TwoStageHooks,
                 recipe={"n_iters": 300})
class TwoStageLearner(TensorLearner):
    config_class = LearnerConfig

    def __init__(self, model: nn.Module, config: LearnerConfig, classes: ClassSet, support=None):
        super().__init__(model, config, classes, support)
        copies = []
        for block, attr, _ in block_norms(model):
            copies.append(NormCopy(getattr(block, attr)))
            setattr(block, attr, TunedNorm(getattr(block, attr), copies[-1]))
        self.norms = nn.ModuleList(copies)
        self.lora_head = nn.Parameter(torch.zeros(len(self.class_names), model.text_projection.shape[1]))
        self.register_buffer("lora_stage", torch.ones((), dtype=torch.long))
        self.register_buffer("prompt_tokens", classes.tokens, persistent=False)  # None when rebuilt from a record
        self.rows = {name: i for i, name in enumerate(self.class_names)}
        self.step_stage: Optional[int] = None  # the stage of the training step (the hooks'), else lora_stage's

    @classmethod
    def check_fits(cls, model: nn.Module, config: LearnerConfig) -> None:
        try:
            norms = block_norms(model)
        except TypeError as err:
            raise ValueError(f"twostage: {err}") from None
        for block, attr, name in norms:
            norm = getattr(block, attr)
            if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
                raise ValueError(f"twostage trains the LayerNorms of every block, but {name} is a "
                                 f"{type(norm).__name__} without a LayerNorm's weight and bias")

    @torch.no_grad()
    def start_second_stage(self, model: nn.Module) -> None:
        """The head from the class prompts' text features as the tuned encoder computes them; stage 2 from now on."""
        if self.prompt_tokens is None:
            raise ValueError("twostage rebuilt from a checkpoint has no class prompts to start its second stage "
                             "from; build it with its training classes (apply_method(classes=...))")
        self.lora_head.copy_(text_features(model, self.prompt_tokens))
        self.lora_stage.fill_(2)

    def second_stage(self) -> bool:
        return self.step_stage == 2 if self.step_stage is not None else int(self.lora_stage) == 2

    def class_state(self, model: nn.Module, classes: ClassSet) -> Classifier:
        if not self.second_stage():
            return Classifier(text_features(model, classes.tokens), False)
        head = F.normalize(self.lora_head, dim=-1)
        if tuple(classes.names) == self.class_names:
            return Classifier(head, True)
        rows = [self.rows.get(name) for name in classes.names]
        known = torch.tensor([row is not None for row in rows], device=head.device)
        trained = head[torch.tensor([0 if row is None else row for row in rows], device=head.device)]
        fresh = text_features(model, classes.tokens) if not bool(known.all()) else trained
        return Classifier(torch.where(known[:, None], trained, fresh), True)

    def logits(self, model: nn.Module, images: torch.Tensor, state: Classifier) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not state.second_stage):
            features = F.normalize(model.encode_image(images).float(), dim=-1)
        return model.logit_scale.exp().float() * features @ state.rows.t()
