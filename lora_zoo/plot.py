"""PLOT++: prompt learning with optimal transport (Chen et al., ICLR 2023), as their ViT trainer computes it.

N text prompts and M sets of visual prompt tokens (docs/METHODS.md, "PLOT++"):

- text: prompt i is ``"<template_i> <name>."`` with the embeddings of its first n words learned
  (``lora_text_context``, N × n × d_text, started from those words), n the word count of the first
  template; the templates are the dataset's four in their trainer (``TEMPLATES``);
- image: set m of ``visual_tokens`` learned tokens (``lora_visual_prompts``, M × v × d_vis, N(0, 0.02²))
  appended after the patch tokens, before ``ln_pre``, at the input only: M prompted passes of the image
  tower (one batch of M·B), whose M class-token features are the image's M local features;
- the M local features of an image and the N prompt features of a class are matched by entropic optimal
  transport (``sinkhorn``: cost 1 − cos, ε = 0.1, uniform masses 1/M and 1/N, at most 100 iterations,
  stopped when the mean change of the row scalings over the whole batch drops below 0.01); the plan is a
  constant for the gradient; the class score is Σ plan · cos;
- logits ``100 · score``; in the first stage also ``+ 100 · cos(mean image feature, mean text feature)``
  (their TRADE_OFF), cross-entropy.

Their two stages, 50 epochs each (``scripts/main_visiononly.sh``, ``main_joint.sh``): the visual prompts
alone on both logits, then both prompt kinds on the transport logits only, started from the first
stage's prompts with a new optimizer and schedule. Here they are one run: ``PlotStages`` (the method's
training hooks) sets the learner's ``stage`` at each iteration, the first half ``"vision"`` (the text
context is computed without gradient, so SGD leaves it, decay included, as their frozen tensor), the
second ``"joint"``; the recipe's ``schedule_cycles: 2`` restarts the warm-up, the cosine and the
optimizer's state at the switch. A learner out of training (evaluation, a checkpoint) is ``"joint"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import TrainingHooks
from .learner import LearnerConfig, PromptLearner, attached_learner
from .options import option
from .registry import register_method
from .scoring import LOGIT_SCALE, ClassSet
from .text import encode_embeddings
from .tower_prompts import TowerPrompts, check_prompt_towers, context_length, context_prompts

# their trainer's four text prompts per dataset (plot-pp/trainers/plotpp.py, template_dict), under our names
GENERIC = ("a photo of a", "this is a photo", "this is picture of", "one picture of a")  # their SUN397 and Caltech
TEMPLATES = {
    "caltech101": GENERIC, "sun397": GENERIC,
    "dtd": ("a photo of a texture", "this is a photo texture", "this is a picture texture", "one picture of a texture"),
    "eurosat": ("a centered satellite photo of", "a centered satellite picture of",
                "this is centered satellite photo of", "one centered satellite photo of a"),
    "fgvc_aircraft": ("a photo of an aircraft", "a picture of an aircraft", "this is aircraft picture of",
                      "one picture of an aircraft"),
    "food101": ("a photo of a food", "this is a food photo", "this is food picture of", "one picture of a food"),
    "imagenet": ("a photo of a", "this is a photo", "this is a", "one picture of a"),
    "oxford_flowers": ("a photo of a flower", "one picture of a flower", "this is flower picture of",
                       "one picture of a flower"),
    "oxford_pets": ("a photo of a pet", "one picture of a pet", "this is pet picture of", "one picture of a pet"),
    "stanford_cars": ("a photo of a", "this is a photo", "this is picture of", "one picture of a"),
    "ucf101": ("a photo of a person doing", "this is a photo people doing", "this is picture of people doing",
               "one picture of a person doing"),
}
VISION, JOINT = "vision", "joint"


def templates_for(dataset: Optional[str], count: int) -> list[str]:
    """The first ``count`` templates of ``dataset`` (their generic four for a dataset they list none for), each
    with "X" placeholders up to the first one's word count (their ImageNet "this is a" would otherwise lose the
    first token of the class name)."""
    chosen = list(TEMPLATES.get(dataset or "", GENERIC)[:count])
    words = len(chosen[0].split())
    return [" ".join(t.split() + ["X"] * (words - len(t.split()))) for t in chosen]


@torch.no_grad()
def sinkhorn(kernel: torch.Tensor, row_mass: torch.Tensor, column_mass: torch.Tensor, iterations: int = 100,
             threshold: float = 1e-2) -> torch.Tensor:
    """Entropic transport plans ``diag(r) K diag(c)`` of a batch of kernels ``K`` (problems × M × N) with row sums
    ``row_mass`` and column sums ``column_mass``; stopped when the mean |Δr| over the whole batch is below
    ``threshold`` (their rule, so a problem's plan depends on its batch) or after ``iterations``."""
    rows, columns = torch.ones_like(row_mass), torch.ones_like(column_mass)
    for _ in range(iterations):
        previous = rows
        rows = row_mass / (kernel @ columns[..., None])[..., 0]
        columns = column_mass / (kernel.transpose(1, 2) @ rows[..., None])[..., 0]
        if (rows - previous).abs().mean().item() < threshold:
            break
    return (rows[..., :, None] * columns[..., None, :]) * kernel


@dataclass
class PlotConfig(LearnerConfig):
    n_text: int = option(4, "text prompts N, the dataset's first N templates (their scripts: 4, all they list)")
    n_visual: int = option(4, "sets of visual prompt tokens M, each one prompted pass of the image tower (their M; "
                              "README: 4)")
    visual_tokens: int = option(2, "learned tokens per visual set (their N_CTX_V)")
    ot_eps: float = option(0.1, "entropic regularisation of the transport (their eps)")
    ot_iterations: int = option(100, "most Sinkhorn iterations (their max_iter)")
    ot_threshold: float = option(1e-2, "Sinkhorn stops when the mean change of the row scalings is below this")

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.n_text <= len(GENERIC):
            raise ValueError(f"plot n_text must be 1..{len(GENERIC)} (their templates per dataset), got {self.n_text}")
        for name in ("n_visual", "visual_tokens", "ot_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"plot {name} must be >= 1, got {getattr(self, name)}")
        if not (self.ot_eps > 0 and self.ot_threshold > 0):
            raise ValueError(f"plot ot_eps and ot_threshold must be > 0, got {self.ot_eps}, {self.ot_threshold}")


class PlotStages(TrainingHooks):
    """PLOT++'s stages in one run: the first half of the iterations ``"vision"``, the rest ``"joint"``."""

    def __init__(self, model: nn.Module, total_steps: int, seed: int = 0, options=None):
        self.learner, self.switch = attached_learner(model), total_steps // 2

    def before_forward(self, step: int) -> None:
        self.learner.stage = VISION if step < self.switch else JOINT

    def finish(self) -> None:
        self.learner.stage = JOINT

    def summary(self) -> dict:
        return {"plot_joint_from_iteration": self.switch}


# their vit.yaml for both stages (50 epochs each: 100 in two cycles); Dassl's SGD is the recipe's, not the method's
@register_method("plot", display_name="PLOT++", citation="Chen et al., ICLR 2023", lr=0.002, hooks=PlotStages,
                 recipe={"optimizer": "sgd", "lr_schedule": "epoch_cosine", "warmup_epochs": 1, "warmup_lr": 1e-5,
                         "eta_min": 0.0, "epochs": lambda shots, dataset: 100, "schedule_cycles": 2, "batch_size": 32,
                         "weight_decay": 5e-4, "drop_last": True})
class PlotLearner(PromptLearner):
    config_class = PlotConfig

    def __init__(self, model, config, classes, support=None, templates: Optional[Sequence[str]] = None):
        super().__init__(model, config, classes, support)
        self.check_fits(model, config)
        self.templates = list(templates or templates_for(classes.dataset, config.n_text))
        self.n_ctx = len(self.templates[0].split())
        text_width, vision_width = model.token_embedding.weight.shape[1], model.visual.transformer.width
        device = model.token_embedding.weight.device
        context = torch.zeros(len(self.templates), self.n_ctx, text_width)
        if classes.tokenizer is not None:  # rebuilt from a checkpoint: no tokenizer, its tensors are loaded next
            self.check_classes(model, config, classes, classes)
            tokens = classes.tokenizer(self.templates).to(device)
            with torch.no_grad():
                context = model.token_embedding(tokens)[:, 1:1 + self.n_ctx].float().cpu()
        visual = nn.init.normal_(torch.empty(config.n_visual, config.visual_tokens, vision_width), std=0.02)
        self.lora_text_context = nn.Parameter(context.to(device))
        self.lora_visual_prompts = nn.Parameter(visual.to(device))
        self.stage = JOINT
        self.prompts = TowerPrompts()
        self.image_input = self.prompts.add(model.visual.ln_pre, "append")
        self._tokens: dict = {}

    @classmethod
    def check_fits(cls, model, config) -> None:
        check_prompt_towers(model, "plot")

    @classmethod
    def check_classes(cls, model, config, classes, training) -> None:
        """Every class name after the longest of every dataset's templates (a run's evaluation on another dataset
        keeps its training templates) fits the text context."""
        longest = max((t for group in TEMPLATES.values() for t in group), key=lambda t: len(t.split()))
        context_prompts(classes.tokenizer, [f"{longest} {name}." for name in classes.names], context_length(model),
                        "plot")

    def record(self) -> dict:
        return {"classes": list(self.class_names), "templates": list(self.templates)}

    @classmethod
    def rebuild(cls, model, config, record) -> "PlotLearner":
        return cls(model, config, ClassSet(tuple(record["classes"])), templates=record["templates"])

    def detach(self) -> None:
        """Take the prompt hook off the image tower."""
        self.prompts.remove()

    def prompt_texts(self, names: Sequence[str]) -> list[str]:
        """Every template with every class name, template-major (row ``i·C + c``), as their trainer orders them."""
        return [f"{template} {name}." for template in self.templates for name in names]

    def tokens(self, model, classes) -> torch.Tensor:
        key = tuple(classes.names)
        if key not in self._tokens:
            self._tokens[key] = context_prompts(classes.tokenizer, self.prompt_texts(key), context_length(model),
                                                "plot")
        if self._tokens[key].device != self.lora_text_context.device:
            self._tokens[key] = self._tokens[key].to(self.lora_text_context.device)
        return self._tokens[key]

    def class_state(self, model, classes) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features of each prompt of each class (N × C × D) and of their mean over the prompts (C × D);
        in the first stage without gradient (the text context is not trained there)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage == JOINT):
            tokens, count = self.tokens(model, classes), len(classes.names)
            embeddings = model.token_embedding(tokens)
            context = self.lora_text_context.to(embeddings.dtype).repeat_interleave(count, dim=0)
            embeddings = torch.cat([embeddings[:, :1], context, embeddings[:, 1 + self.n_ctx:]], dim=1)
            features = encode_embeddings(model, embeddings, tokens).float().view(len(self.templates), count, -1)
        return F.normalize(features, dim=-1), F.normalize(features.mean(dim=0), dim=-1)

    def local_features(self, model, images) -> torch.Tensor:
        """The class-token features of the M prompted passes (M × B × D, unnormalised)."""
        with self.prompts.filled({self.image_input: self.lora_visual_prompts}):
            features = model.encode_image(images).float()
        return features.view(self.config.n_visual, len(images), -1)

    def logits(self, model, inputs, state) -> torch.Tensor:
        text, text_pool = state
        local = self.local_features(model, inputs)
        image_pool = F.normalize(local.mean(dim=0), dim=-1)
        local = F.normalize(local, dim=-1)
        (sets, batch, _), (prompts, count, _) = local.shape, text.shape
        similarity = torch.einsum("mbd,ncd->bcmn", local, text).reshape(batch * count, sets, prompts)
        kernel = torch.exp(-(1.0 - similarity.detach().float()) / self.config.ot_eps)
        with torch.autocast(kernel.device.type, enabled=False):  # the plan in fp32 under any autocast
            plan = sinkhorn(kernel, kernel.new_full((batch * count, sets), 1.0 / sets),
                            kernel.new_full((batch * count, prompts), 1.0 / prompts),
                            self.config.ot_iterations, self.config.ot_threshold)
        transport = LOGIT_SCALE * (plan * similarity).sum(dim=(1, 2)).view(batch, count)
        if self.stage == VISION:
            return LOGIT_SCALE * image_pool @ text_pool.t() + transport
        return transport
