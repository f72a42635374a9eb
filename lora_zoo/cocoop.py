"""CoCoOp: CoOp's context shifted by a function of each image (Zhou, Yang, Loy & Liu, "Conditional Prompt Learning
for Vision-Language Models", CVPR 2022; KaiyangZhou/CoOp ``trainers/cocoop.py``; docs/METHODS.md, "CoCoOp").

A meta-net ``Linear(vis, vis/16) → ReLU → Linear(vis/16, width)`` maps each image's normalised feature to one
shift added to every context token; each image is scored against the class prompts built from its own shifted
context: ``logits[b, c] = logit_scale.exp() · cos(f_b, t_c(ctx + meta(f_b)))``, cross-entropy. Their
``vit_b16_c4_ep10_batch1_ctxv1`` config: four tokens from "a photo of a", batch 1, 10 epochs, SGD at 0.002 with
Dassl's warm-up and cosine.

The text tower runs over ``images × classes`` prompts. Their trainer loops over the images, one pass of the
classes' prompts each; here the images of a batch go through in one pass (``images_per_pass``: all of a training
batch; at evaluation as many as keep a pass at ``PROMPTS_PER_PASS`` prompts), with the same numbers as the loop
(``images_per_pass = 1``; ``tests/test_prompt_learners.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .learner import LearnerConfig
from .options import option
from .prompting import (ClassPrompts, ContextLearner, PromptState, check_context_options, context_tokens, dassl_recipe,
                        image_features, initial_context, insert_context, logit_scale,
                        prompt_features)
from .registry import register_method

PROMPTS_PER_PASS = 4096  # evaluation: images of a batch per text-tower pass, so that a pass holds at most these


@dataclass
class CocoopConfig(LearnerConfig):
    n_ctx: Optional[int] = option(None, "learned context tokens (null: the words of ctx_init, else 4)")
    ctx_init: str = option("a photo of a", "phrase whose token embeddings initialise the context, one token per "
                                           "word; empty: N(0, 0.02^2)")

    def __post_init__(self):
        super().__post_init__()
        self.ctx_init = self.ctx_init.replace("_", " ")
        check_context_options(self.n_ctx, self.ctx_init)

    @property
    def context_tokens(self) -> int:
        return context_tokens(self.n_ctx, self.ctx_init, 4)  # their c4 configs


# lr 0.002, SGD, batch 1, 10 epochs, Dassl's schedule: their configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml
@register_method("cocoop", display_name="CoCoOp", citation="Zhou et al., CVPR 2022", lr=0.002,
                 recipe=dassl_recipe(1, lambda shots, dataset: 10))
class CocoopLearner(ContextLearner):
    config_class = CocoopConfig

    def __init__(self, model, config: CocoopConfig, classes, support=None):
        super().__init__(model, config, classes, support)
        width, visual = model.token_embedding.weight.shape[1], model.visual.output_dim
        self.lora_context = nn.Parameter(initial_context(model, classes, config.ctx_init,
                                                         (config.context_tokens, width)))
        device = model.token_embedding.weight.device
        # nn.Linear's initialisation, drawn in their order (linear1, then linear2)
        hidden, output = nn.Linear(visual, visual // 16, device=device), nn.Linear(visual // 16, width, device=device)
        self.lora_meta_weight1, self.lora_meta_bias1 = nn.Parameter(hidden.weight.data), nn.Parameter(hidden.bias.data)
        self.lora_meta_weight2, self.lora_meta_bias2 = nn.Parameter(output.weight.data), nn.Parameter(output.bias.data)
        self.images_per_pass: Optional[int] = None  # None: all of a training batch; 1: their per-image loop

    def prefix(self, classes) -> str:
        return self.config.ctx_init or super().prefix(classes)


    def meta_shift(self, features: torch.Tensor) -> torch.Tensor:
        """The meta-net's shift of the context for each normalised image feature, ``B × width``."""
        hidden = F.relu(F.linear(features, self.lora_meta_weight1, self.lora_meta_bias1))
        return F.linear(hidden, self.lora_meta_weight2, self.lora_meta_bias2)

    def class_state(self, model, classes) -> PromptState:
        return PromptState(classes, self.prompts(model, classes))  # the text side depends on the image

    def logits(self, model, images: torch.Tensor, state: PromptState) -> torch.Tensor:
        return self.image_logits(model, image_features(model, images), state.prompts)

    def image_logits(self, model, features: torch.Tensor, prompts: ClassPrompts) -> torch.Tensor:
        """``logit_scale.exp() · cos(f_b, t_c)`` with each image's class prompts built from its shifted context,
        ``images_per_pass`` images of the batch through the text tower at a time."""
        contexts = self.lora_context[None] + self.meta_shift(features)[:, None]   # B × n_ctx × width
        per_pass = self.images_per_pass or (len(features) if torch.is_grad_enabled()
                                            else max(1, PROMPTS_PER_PASS // len(prompts)))
        scale, rows = logit_scale(model), []
        for start in range(0, len(features), per_pass):
            context = contexts[start:start + per_pass, None].expand(-1, len(prompts), -1, -1)
            text = prompt_features(model, prompts, insert_context(prompts, context))  # b × n_cls × D
            rows.append(scale * (text * features[start:start + per_pass, None]).sum(-1))
        return torch.cat(rows)
