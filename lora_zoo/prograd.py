"""ProGrad: CoOp's update with its part against the zero-shot prediction projected out (Zhu, Niu, Han, Wu & Zhang,
"Prompt-aligned Gradient for Prompt Tuning", ICCV 2023; BeierZhu/Prompt-align ``ProGrad.public/trainers/prograd.py``
and ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` ``prograd_backward_and_update``; docs/METHODS.md, "ProGrad").

Sixteen context tokens: with their ``CTX_INIT`` the last k start as the token embeddings of the dataset's template
without its " {}." (k = its words), the first 16 − k as zeros, the prompt string being ``"X … X <template words>
{name}."``. For a template with a comma ("a type of pet, a photo of a {}.": 8 words, 9 tokens) the words are
counted, not the tokens, so the context covers the first 8 tokens and the template's last token ("a") stays a
fixed token before the name: their off-by-one, reproduced (docs/METHODS.md). The teacher is the frozen model with the
same template (``TEMPLATES``, their ``CUSTOM_TEMPLATES`` keyed by our dataset names; "a photo of a {}." for a
dataset they do not list). Per step, with ``g_ce`` and ``g_kl`` the gradients of the cross-entropy and of the
distillation ``KL = mean_b Σ_c −softmax(t/T)·log_softmax(s/T)·T²`` for each trained tensor: if ``cos(g_ce, g_kl)
< 0`` the update is ``g_ce − λ (g_ce · ĝ_kl) ĝ_kl``, else ``g_ce`` (``backward``). λ = 1, 0.8 on Flowers, DTD and
EuroSAT at 8 and 16 shots (their README); T = 1. Trained as CoOp (their configs are RN50 only: the same SGD, batch
32, Dassl's schedule and epochs per shot count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .learner import LearnerConfig
from .options import option
from .prompting import (FALLBACK_TEMPLATE, ContextLearner, PromptState, check_context, check_prompts_fit,
                        coop_epochs, dassl_recipe, image_features, logit_scale, phrase_embeddings, random_context,
                        word_count)
from .registry import register_method
from .scoring import ClassSet, text_features

#: their CUSTOM_TEMPLATES (ProGrad.public/trainers/prograd.py), by our dataset names (datasets.list_datasets())
TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
REDUCED_LAMBDA = ("oxford_flowers", "dtd", "eurosat")  # their README: λ 0.8 at 8 and 16 shots


def template_of(dataset) -> str:
    return TEMPLATES.get(dataset, FALLBACK_TEMPLATE)


def template_words(dataset) -> str:
    """Their context phrase: the dataset's template without " {}." (underscores read as spaces)."""
    return template_of(dataset).replace(" {}.", "").replace("_", " ")


@dataclass
class ProgradConfig(LearnerConfig):
    n_ctx: int = option(16, "learned context tokens")
    ctx_init: bool = option(True, "their CTX_INIT: the last tokens start as the words of the dataset's template, "
                                  "the others as zeros; false: N(0, 0.02^2)")
    prograd_lambda: float = option(1.0, "how much of the cross-entropy gradient's component against the KL's is "
                                        "removed (1: all); a run's default is their README's: 0.8 on Flowers, DTD "
                                        "and EuroSAT at 8 and 16 shots")
    temperature: float = option(1.0, "T of the distillation to the zero-shot prediction")

    def __post_init__(self):
        super().__post_init__()
        for name, ok, need in (("n_ctx", self.n_ctx >= 1, ">= 1"), ("prograd_lambda", self.prograd_lambda >= 0, ">= 0"),
                               ("temperature", self.temperature > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} must be {need}, got {getattr(self, name)}")


def run_lambda(shots: int, dataset: str) -> float:
    return 0.8 if dataset in REDUCED_LAMBDA and shots >= 8 else 1.0


# lr 0.002, SGD, batch 32, Dassl's schedule, CoOp's epochs per shots: their configs/trainers/ProGrad/rn50*.yaml
@register_method("prograd", display_name="ProGrad", citation="Zhu et al., ICCV 2023", lr=0.002,
                 recipe=dassl_recipe(32, coop_epochs), options={"prograd_lambda": run_lambda})
class ProgradLearner(ContextLearner):
    config_class = ProgradConfig

    def __init__(self, model, config: ProgradConfig, classes, support=None):
        super().__init__(model, config, classes, support)
        width, device = model.token_embedding.weight.shape[1], model.token_embedding.weight.device
        if not config.ctx_init:
            context = random_context((config.n_ctx, width), device)
        else:
            words = template_words(classes.dataset)
            check_template(config.n_ctx, classes.dataset, self.method_name)
            context = torch.zeros(config.n_ctx, width, device=device)
            if classes.tokenizer is not None:  # else rebuilt from a checkpoint: its tensors are loaded next
                context[config.n_ctx - word_count(words):] = phrase_embeddings(model, classes.tokenizer, words,
                                                                               word_count(words))
        self.lora_context = nn.Parameter(context)
        self._teacher: dict = {}  # the zero-shot classifier's normalised text features, by class set

    def prefix(self, classes) -> str:
        if not self.config.ctx_init:
            return super().prefix(classes)
        check_template(self.n_ctx, classes.dataset, self.method_name)
        words = template_words(classes.dataset)
        return " ".join(["X"] * (self.n_ctx - word_count(words))) + " " + words

    @classmethod
    def check_fits(cls, model, config: ProgradConfig) -> None:
        check_context(model, config.n_ctx, cls.method_name)

    @classmethod
    def check_classes(cls, model, config: ProgradConfig, classes, training) -> None:
        prefix = " ".join(["X"] * config.n_ctx)
        if config.ctx_init:
            check_template(config.n_ctx, classes.dataset, cls.method_name)
            words = template_words(classes.dataset)
            prefix = " ".join(["X"] * (config.n_ctx - word_count(words))) + " " + words
        check_prompts_fit(classes, prefix, config.n_ctx, int(model.positional_embedding.shape[0]), cls.method_name)

    def teacher(self, model, classes: ClassSet) -> torch.Tensor:
        template = template_of(classes.dataset)
        key = (tuple(classes.names), template, str(model.token_embedding.weight.device))
        if key not in self._teacher:
            tokens = classes.tokenizer([template.format(name.replace("_", " ")) for name in classes.names])
            with torch.no_grad():
                self._teacher[key] = text_features(model, tokens.to(model.token_embedding.weight.device))
        return self._teacher[key]

    def losses(self, model, images, labels, state: PromptState) -> dict:
        features, scale = image_features(model, images), logit_scale(model)
        student = scale * features @ state.features.t()
        with torch.no_grad():
            teacher = scale * features @ self.teacher(model, state.classes).t()
        T = self.config.temperature
        kl = (-F.softmax(teacher / T, dim=-1) * F.log_softmax(student / T, dim=-1) * T * T).sum(1).mean()
        return {"loss": F.cross_entropy(student, labels), "kl": kl}

    def backward(self, losses: dict, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The gradient of every term but the KL, its component against the KL's gradient projected out (per
        tensor, as their ``prograd_backward_and_update``); returns the cross-entropy (the KL trains nothing)."""
        distillation = losses["kl"]
        task = sum(value for name, value in losses.items() if name != "kl")
        tensors = [p for p in self.parameters() if p.requires_grad]
        kl_grads = torch.autograd.grad(scale(distillation), tensors, retain_graph=True, allow_unused=True)
        scale(task).backward()
        with torch.no_grad():
            for tensor, kl_grad in zip(tensors, kl_grads):
                if tensor.grad is not None and kl_grad is not None:
                    tensor.grad = project(tensor.grad, kl_grad, self.config.prograd_lambda)
        return task


def project(task_grad: torch.Tensor, kl_grad: torch.Tensor, strength: float) -> torch.Tensor:
    """``g − λ (g · ĝ_kl) ĝ_kl`` when ``g`` points against ``g_kl`` (negative cosine), else ``g``."""
    kl_unit = kl_grad / torch.linalg.norm(kl_grad)
    task_unit = task_grad / torch.linalg.norm(task_grad)
    against = torch.dot(task_unit.flatten(), kl_unit.flatten()) < 0  # a tensor: no wait for the device
    return torch.where(against, task_grad - strength * torch.dot(task_grad.flatten(), kl_unit.flatten()) * kl_unit,
                       task_grad)


def check_template(n_ctx: int, dataset, method: str) -> None:
    words = template_words(dataset)
    if word_count(words) > n_ctx:
        raise ValueError(f"{method}: n_ctx {n_ctx} is shorter than the {word_count(words)} words of the template "
                         f"{words!r} its context starts from (ctx_init); use n_ctx >= {word_count(words)}")
