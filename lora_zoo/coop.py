"""CoOp: learned context tokens in every class prompt (Zhou, Yang, Loy & Liu, "Learning to Prompt for
Vision-Language Models", IJCV 2022; KaiyangZhou/CoOp ``trainers/coop.py``; docs/METHODS.md, "CoOp").

``n_ctx`` context vectors, shared by every class (or one set per class with ``csc``), take the place of the
first ``n_ctx`` tokens after the start token of ``"X X … X {name}."`` (or of the ``ctx_init`` phrase, whose
token embeddings initialise them; random N(0, 0.02²) otherwise); the class name comes after them (``end``),
in their middle or before them (``front``). The text tower runs on the assembled prompts every step; logits
are ``logit_scale.exp() · cos(image, class)``, the loss cross-entropy. Trained as Dassl trains it: SGD
(momentum 0.9, weight decay 5e-4) at 0.002, batch 32, one warm-up epoch at 1e-5 then a cosine per epoch,
50 / 100 / 200 epochs at 1 / 2-4 / 8-16 shots (ImageNet 50).

The NoRA paper's Table 2 has two CoOp rows: "CoOp (4)" (``coop4``: four tokens from "a photo of a", their
``*_ctxv1`` configs) and "CoOp (16)" (``coop16``: sixteen random tokens, their few-shot scripts). Plain
``coop`` has the defaults of their ``train.py``: sixteen random tokens, the name at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

from .learner import LearnerConfig
from .options import option
from .prompting import (ContextLearner, check_context_options, context_tokens, coop_epochs, dassl_recipe,
                        initial_context)
from .registry import register_method, register_preset

CITATION = "Zhou et al., IJCV 2022"
DEFAULT_TOKENS = 16  # their train.py's N_CTX


@dataclass
class CoopConfig(LearnerConfig):
    n_ctx: Optional[int] = option(None, "learned context tokens (null: the words of ctx_init, else 16)")
    ctx_init: str = option("", "phrase whose token embeddings initialise the context, one token per word (e.g. "
                               "'a photo of a': n_ctx 4; underscores read as spaces); empty: N(0, 0.02^2)")
    csc: bool = option(False, "class-specific context: one set of n_ctx tokens per training class (random init)")
    class_token_position: Literal["end", "middle", "front"] = option(
        "end", "where the class name sits: after the context (end), in its middle, or before it (front)")

    def __post_init__(self):
        super().__post_init__()
        self.ctx_init = self.ctx_init.replace("_", " ")
        check_context_options(self.n_ctx, self.ctx_init)
        if self.csc and self.ctx_init:
            raise ValueError("csc draws one random context per class: it takes no ctx_init (CoOp ignores csc "
                             "with an init phrase)")

    @property
    def context_tokens(self) -> int:
        return context_tokens(self.n_ctx, self.ctx_init, DEFAULT_TOKENS)


# lr 0.002, SGD, batch 32, Dassl's schedule: their configs/trainers/CoOp/vit_b16*.yaml
@register_method("coop", display_name="CoOp", citation=CITATION, lr=0.002,
                 recipe=dassl_recipe(32, coop_epochs))
class CoopLearner(ContextLearner):
    config_class = CoopConfig

    def __init__(self, model, config: CoopConfig, classes, support=None):
        super().__init__(model, config, classes, support)
        self.position = config.class_token_position
        width = model.token_embedding.weight.shape[1]
        shape = (len(classes), config.context_tokens, width) if config.csc else (config.context_tokens, width)
        self.lora_context = nn.Parameter(initial_context(model, classes, config.ctx_init, shape))

    def prefix(self, classes) -> str:
        return self.config.ctx_init or super().prefix(classes)

    @classmethod
    def check_classes(cls, model, config: CoopConfig, classes, training) -> None:
        super().check_classes(model, config, classes, training)
        if config.csc and tuple(classes.names) != tuple(training.names):
            raise ValueError(f"{cls.method_name} with csc learns one context per training class: it cannot "
                             "score other classes (base-to-new's new classes, --eval_on datasets)")


# the NoRA paper's Table 2 rows: CoOp's two published settings
register_preset("coop4", layer="coop", display_name="CoOp (4)", citation=CITATION, lr=0.002,
                options={"ctx_init": "a photo of a"})
register_preset("coop16", layer="coop", display_name="CoOp (16)", citation=CITATION, lr=0.002,
                options={"n_ctx": 16})
