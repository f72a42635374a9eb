"""KgCoOp: CoOp kept close to the hand-crafted prompts' text features (Yao, Zhang & Xu, "Visual-Language Prompt
Tuning with Knowledge-guided Context Optimization", CVPR 2023; htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py``;
docs/METHODS.md, "KgCoOp").

CoOp's learned context (the ``end`` layout) plus a term pulling each class's learned text feature toward the frozen
model's feature of the dataset's hand-crafted prompt: ``loss = CE + weight · (1 − mean_c cos(t_c, t_c^clip))``,
weight 8.0 (their scripts). The templates are their ``CUSTOM_TEMPLATES``, keyed here by our dataset names (a dataset
they do not list, e.g. the scene tasks or an image folder, takes "a photo of a {}."). Their config
``vit_b16_ep100_ctxv1``: four tokens from "a photo of a", batch 128, 100 epochs, SGD at 0.002, Dassl's schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .learner import LearnerConfig
from .options import option
from .prompting import (FALLBACK_TEMPLATE, ContextLearner, PromptState, check_context_options, context_tokens,
                        dassl_recipe, image_features, initial_context, logit_scale)
from .registry import register_method
from .scoring import ClassSet, text_features

#: their CUSTOM_TEMPLATES (KgCoOp/trainers/kgcoop.py), by our dataset names (datasets.list_datasets())
TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}


@dataclass
class KgcoopConfig(LearnerConfig):
    n_ctx: Optional[int] = option(None, "learned context tokens (null: the words of ctx_init, else 4)")
    ctx_init: str = option("a photo of a", "phrase whose token embeddings initialise the context (their code "
                                           "hard-codes 'a photo of a'); empty: N(0, 0.02^2)")
    weight: float = option(8.0, "weight of 1 - mean cos(learned, hand-crafted class text features) (their scripts' "
                                "W; their train.py's default is 1.0)")

    def __post_init__(self):
        super().__post_init__()
        self.ctx_init = self.ctx_init.replace("_", " ")
        check_context_options(self.n_ctx, self.ctx_init)
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")

    @property
    def context_tokens(self) -> int:
        return context_tokens(self.n_ctx, self.ctx_init, 4)  # their scripts' NCTX


# lr 0.002, SGD, batch 128, 100 epochs, Dassl's schedule: their configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml
@register_method("kgcoop", display_name="KgCoOp", citation="Yao et al., CVPR 2023", lr=0.002,
                 recipe=dassl_recipe(128, lambda shots, dataset: 100))
class KgcoopLearner(ContextLearner):
    config_class = KgcoopConfig

    def __init__(self, model, config: KgcoopConfig, classes, support=None):
        super().__init__(model, config, classes, support)
        width = model.token_embedding.weight.shape[1]
        self.lora_context = nn.Parameter(initial_context(model, classes, config.ctx_init,
                                                         (config.context_tokens, width)))
        self._targets: dict = {}  # the hand-crafted prompts' frozen features, by class set

    def prefix(self, classes) -> str:
        return self.config.ctx_init or super().prefix(classes)


    def targets(self, model, classes: ClassSet) -> torch.Tensor:
        """Normalised features of the frozen model for the dataset's hand-crafted prompt of each class."""
        template = TEMPLATES.get(classes.dataset, FALLBACK_TEMPLATE)
        key = (tuple(classes.names), template, str(model.token_embedding.weight.device))
        if key not in self._targets:
            tokens = classes.tokenizer([template.format(name.replace("_", " ")) for name in classes.names])
            with torch.no_grad():
                self._targets[key] = text_features(model, tokens.to(model.token_embedding.weight.device))
        return self._targets[key]

    def losses(self, model, images, labels, state: PromptState) -> dict:
        logits = logit_scale(model) * image_features(model, images) @ state.features.t()
        similarity = F.cosine_similarity(state.features, self.targets(model, state.classes), dim=1, eps=1e-7)
        return {"loss": F.cross_entropy(logits, labels), "knowledge": self.config.weight * (1 - similarity.mean())}
