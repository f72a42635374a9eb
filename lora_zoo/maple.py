"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023), as their trainer computes it.

Learned tokens in both towers, coupled (docs/METHODS.md, "MaPLe"). J = ``depth`` text prompts P_j
(``n_ctx`` × text width) and, for each, a linear map F_j, the coupling function, that gives the image
tower's prompt F_j(P_j) (``n_ctx`` × vision width):

- text: the class prompt is ``"<ctx_init> <name>."``; P_0 takes the place of the embeddings of its first
  ``n_ctx`` words (positions 1..n_ctx after the start token; the rest of the phrase stays as it is);
  blocks 1..J-1 get P_j in those positions in place of what the previous block made of them (no
  positional embedding added), later blocks carry what came out;
- image: F_0(P_0) is appended after the patch tokens, after the positional embedding and before
  ``ln_pre`` (which normalises it too); blocks 1..J-1 get F_j(P_j) in place of the last ``n_ctx`` tokens;
- logits ``100 · cos(image feature, text feature)``, cross-entropy.

Both towers are open_clip's own, the prompts put in by forward pre-hooks (``tower_prompts.py``), so
the learner's ``logits`` runs the image tower with its prompts, and the model's other uses see none.
Init as theirs: P_0 from the embeddings of ``ctx_init``'s first words (N(0, 0.02²) and "X" placeholders
when ``n_ctx`` exceeds its words or it is empty), P_1.. ~ N(0, 0.02²), F_0 a ``Linear``'s default init,
F_1.. one ``Linear``'s default init copied to each (their ``_get_clones``). The tensors are stacked
(``lora_text_prompts`` J × n × d_text, ``lora_coupling_weight`` J × d_vis × d_text,
``lora_coupling_bias`` J × d_vis): SGD treats each entry alone, so this is their ``ctx``, ``proj``,
``compound_prompts_text`` and ``compound_prompt_projections`` side by side.

Recipe (their ``vit_b16_c2_ep5_batch4_2ctx.yaml``, the one ViT config of their repository, made for
base-to-new; we use it for few-shot runs too, as the repository has no few-shot config): Dassl's SGD
(momentum 0.9, weight decay 5e-4), lr 0.0035, batch 4 (``drop_last``), 5 epochs, one warm-up epoch at
1e-5, then the per-epoch cosine. They train in fp16 with fp16 ``ctx`` and ``proj`` and fp32 deep
prompts; here every tensor is fp32 (under the run's autocast).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .learner import LearnerConfig, PromptLearner
from .options import option
from .registry import register_method
from .scoring import LOGIT_SCALE
from .text import encode_embeddings
from .tower_prompts import TowerPrompts, check_prompt_towers, context_length, context_prompts, tower_blocks


@dataclass
class MapleConfig(LearnerConfig):
    n_ctx: int = option(2, "learned tokens per prompt, in each tower (their N_CTX)")
    depth: int = option(9, "blocks of each tower that get prompts: the input and blocks 1..depth-1 (their "
                           "PROMPT_DEPTH; at most the towers' block count)")
    ctx_init: str = option("a photo of a", "phrase before the class name whose first n_ctx word embeddings start "
                                           "the input prompt ('' or fewer words than n_ctx: random, 'X' placeholders)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_ctx", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"maple {name} must be >= 1, got {getattr(self, name)}")

    @property
    def from_words(self) -> bool:
        """The input prompt starts from ``ctx_init``'s words (it has at least ``n_ctx`` of them)."""
        return 0 < self.n_ctx <= len(self.ctx_init.replace("_", " ").split())

    @property
    def prefix(self) -> str:
        """The words before each class name: ``ctx_init``, or one "X" per learned token."""
        return " ".join(self.ctx_init.replace("_", " ").split() if self.from_words else ["X"] * self.n_ctx)


# the recipe's SGD is Dassl's, not the method's: --recipe clip_lora trains the same prompts with AdamW
@register_method("maple", display_name="MaPLe", citation="Khattak et al., CVPR 2023", lr=0.0035,
                 recipe={"optimizer": "sgd", "lr_schedule": "epoch_cosine", "warmup_epochs": 1, "warmup_lr": 1e-5,
                         "eta_min": 0.0, "epochs": lambda shots, dataset: 5, "batch_size": 4, "weight_decay": 5e-4,
                         "drop_last": True})
class MapleLearner(PromptLearner):
    config_class = MapleConfig

    def __init__(self, model, config, classes, support=None):
        super().__init__(model, config, classes, support)
        self.check_fits(model, config)
        depth, n_ctx = config.depth, config.n_ctx
        text_width, vision_width = model.token_embedding.weight.shape[1], model.visual.transformer.width
        device = model.token_embedding.weight.device
        first = self._first_prompt(model, config, classes, text_width)
        projection = nn.Linear(text_width, vision_width)          # F_0: their proj
        deep = torch.empty(depth - 1, n_ctx, text_width)
        for prompt in deep:
            nn.init.normal_(prompt, std=0.02)                      # their compound_prompts_text
        shared = nn.Linear(text_width, vision_width)               # F_1.. start as copies of one layer
        self.lora_text_prompts = nn.Parameter(torch.cat([first[None], deep]).to(device))
        self.lora_coupling_weight = nn.Parameter(torch.stack(
            [projection.weight.detach()] + [shared.weight.detach()] * (depth - 1)).to(device))
        self.lora_coupling_bias = nn.Parameter(torch.stack(
            [projection.bias.detach()] + [shared.bias.detach()] * (depth - 1)).to(device))
        if classes.tokenizer is not None:
            self.check_classes(model, config, classes, classes)
        self.prompts = TowerPrompts()
        vision_blocks, vision_first = tower_blocks(model, "vision")
        text_blocks, text_first = tower_blocks(model, "text")
        self.image_input = self.prompts.add(model.visual.ln_pre, "append")
        self.image_deep = [self.prompts.add(vision_blocks[j], "replace_last", vision_first) for j in range(1, depth)]
        self.text_deep = [self.prompts.add(text_blocks[j], "replace_after_first", text_first) for j in range(1, depth)]
        self._tokens: dict = {}

    @staticmethod
    def _first_prompt(model, config, classes, width) -> torch.Tensor:
        """P_0: the embeddings of ``ctx_init``'s first ``n_ctx`` words, or N(0, 0.02²); zeros when rebuilt from a
        checkpoint (no tokenizer: its tensors are loaded next)."""
        if not config.from_words:
            return nn.init.normal_(torch.empty(config.n_ctx, width), std=0.02)
        if classes.tokenizer is None:
            return torch.zeros(config.n_ctx, width)
        tokens = classes.tokenizer([config.prefix]).to(model.token_embedding.weight.device)
        with torch.no_grad():
            return model.token_embedding(tokens)[0, 1:1 + config.n_ctx].float().cpu()

    @classmethod
    def check_fits(cls, model, config) -> None:
        vision, text = check_prompt_towers(model, "maple")
        if config.depth > min(vision, text):
            raise ValueError(f"maple depth {config.depth} exceeds the blocks of the towers (vision {vision}, text "
                             f"{text})")
        length = context_length(model)
        if config.n_ctx + 3 > length:  # start, at least one name token, ".", end
            raise ValueError(f"maple n_ctx {config.n_ctx} leaves no room for a class name in the text context of "
                             f"{length} tokens")

    @classmethod
    def check_classes(cls, model, config, classes, training) -> None:
        context_prompts(classes.tokenizer, [f"{config.prefix} {name}." for name in classes.names],
                        context_length(model), "maple")

    def detach(self) -> None:
        """Take the prompt hooks off the model's blocks (the learner no longer changes what the towers compute)."""
        self.prompts.remove()

    def image_prompts(self) -> torch.Tensor:
        """F_j(P_j) for every depth j: ``depth × n_ctx × vision width``."""
        return torch.baddbmm(self.lora_coupling_bias[:, None], self.lora_text_prompts,
                             self.lora_coupling_weight.transpose(1, 2))

    def tokens(self, model, classes) -> torch.Tensor:
        key = tuple(classes.names)
        if key not in self._tokens:
            self._tokens[key] = context_prompts(classes.tokenizer, [f"{self.config.prefix} {n}." for n in key],
                                                context_length(model), "maple")
        if self._tokens[key].device != self.lora_text_prompts.device:
            self._tokens[key] = self._tokens[key].to(self.lora_text_prompts.device)
        return self._tokens[key]

    def class_state(self, model, classes) -> torch.Tensor:
        """The classes' normalised text features, with the text prompts in their blocks."""
        tokens, n_ctx = self.tokens(model, classes), self.config.n_ctx
        embeddings = model.token_embedding(tokens)
        first = self.lora_text_prompts[0].to(embeddings.dtype).expand(len(tokens), -1, -1)
        embeddings = torch.cat([embeddings[:, :1], first, embeddings[:, 1 + n_ctx:]], dim=1)
        with self.prompts.filled(dict(zip(self.text_deep, self.lora_text_prompts[1:]))):
            features = encode_embeddings(model, embeddings, tokens)
        return F.normalize(features.float(), dim=-1)

    def image_features(self, model, images) -> torch.Tensor:
        """Normalised image features with the image prompts in their blocks."""
        prompts = self.image_prompts()
        with self.prompts.filled({self.image_input: prompts[:1], **dict(zip(self.image_deep, prompts[1:]))}):
            features = model.encode_image(images)
        return F.normalize(features.float(), dim=-1)

    def logits(self, model, inputs, state) -> torch.Tensor:
        return LOGIT_SCALE * self.image_features(model, inputs) @ state.t()
