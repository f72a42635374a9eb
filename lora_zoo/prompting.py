"""Prompt assembly shared by the CoOp family of prompt learners (CoOp, CoCoOp, KgCoOp, ProGrad; MaPLe and PLOT++
build on it), as CoOp's trainer assembles prompts (Zhou et al., IJCV 2022; docs/METHODS.md, "Prompt learners").

A class prompt is the token embeddings of the string ``f"{prefix} {name}."`` (``prefix`` = ``"X X … X"``, one
``X`` per learned token, or an initialisation phrase), with the embeddings at positions ``1 … n_ctx`` (right
after the start token) replaced by the learned context; the text tower runs on that sequence and pools at the
end token of the tokenised string (``text.encode_embeddings``, on the shortest exact context). The context sits
after the start token (``end``: the name after it), around the name (``middle``) or after the name (``front``),
the name's tokens being the first tokens after the context in the tokenised string, as CoOp takes them.

The API (stable; other learners build on it):

- ``class_prompts(model, classes, prefix, n_ctx, position)`` → ``ClassPrompts``: the frozen side of one class
  set's prompts (token ids, their embeddings, where each position of the assembled prompt comes from);
- ``insert_context(prompts, context)``: prompt embeddings with ``context`` (``… × n_cls × n_ctx × width``; any
  leading dimensions, e.g. one context per image for CoCoOp) spliced in;
- ``prompt_features(model, prompts, embeddings)``: their normalised text features (``… × n_cls × D``, fp32), all
  prompts in one pass of the text tower;
- ``image_features(model, images)``, ``logit_scale(model)``: the other factors of CoOp's logits;
- ``phrase_embeddings(model, tokenizer, phrase, count)`` and ``initial_context``: CoOp's ``ctx_init`` (the
  embeddings of a phrase's first ``count`` tokens, ``count`` = its words) or N(0, 0.02²) (``random_context``);
- ``check_context(model, n_ctx, method)``, ``check_prompts_fit(classes, prefix, n_ctx, context, method)``,
  ``check_context_options(n_ctx, ctx_init)``: one-line errors before any work;
- ``ContextLearner``: a ``PromptLearner`` with one learned context ``lora_context`` (generic or class-specific)
  whose class side (``class_state`` → ``PromptState``) is the text tower on the assembled prompts and whose logits
  are ``logit_scale.exp() · cos`` (CoOp's); a subclass sets the tensor and says ``prefix(classes)``;
- ``dassl_recipe(batch_size, epochs)`` and ``coop_epochs``: the loop settings of Dassl's trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .learner import PromptLearner
from .scoring import ClassSet
from .text import encode_embeddings, short_context_length

POSITIONS = ("end", "middle", "front")
CONTEXT_STD = 0.02  # CoOp's random context: N(0, 0.02²)
FALLBACK_TEMPLATE = "a photo of a {}."  # for a dataset an official template table does not list


def dassl_recipe(batch_size: int, epochs: Callable[[int, str], int]) -> dict[str, Any]:
    """The loop settings of Dassl's trainer as the CoOp family's configs run it: SGD (momentum 0.9, weight decay
    5e-4); one warm-up epoch at the constant 1e-5, then a cosine stepped per epoch to 0; Dassl's loader drops the
    short last batch when the set holds a full one. The optimizer is part of the recipe, not of the method:
    ``recipe: clip_lora`` trains the same learner with CLIP-LoRA's AdamW."""
    return {"optimizer": "sgd", "lr_schedule": "epoch_cosine", "warmup_epochs": 1, "warmup_lr": 1e-5,
            "eta_min": 0.0, "weight_decay": 5e-4, "batch_size": batch_size, "drop_last": True, "epochs": epochs}


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's few-shot configs (COOP.md): 50 epochs at 1 shot, 100 at 2-4, 200 at 8-16; ImageNet 50 at every count."""
    if dataset == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def word_count(phrase: str) -> int:
    """Tokens CoOp reserves for an initialisation phrase: its words, ``len(phrase.split(" "))`` (one BPE token per
    word assumed, as their trainers do: a word of two tokens leaves its second in the fixed suffix)."""
    return len(phrase.split(" "))


def _encode(tokenizer, text: str) -> list[int]:
    """The BPE ids of ``text`` without start and end tokens."""
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text))
    ids = tokenizer([text])[0]
    return [int(t) for t in ids[1:int(ids.argmax())]]


@dataclass(frozen=True)
class ClassPrompts:
    """The frozen side of the prompts of one class set: ``tokens`` (n_cls × L ids of ``f"{prefix} {name}."``), their
    token ``embeddings`` (n_cls × L × width), ``n_ctx`` learned positions after the start token, and ``order``
    (n_cls × L: the position of the ``end`` layout each position takes; None for ``end`` itself)."""

    names: tuple[str, ...]
    tokens: torch.Tensor
    embeddings: torch.Tensor
    n_ctx: int
    order: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.names)


def check_context(model: nn.Module, n_ctx: int, method: str) -> None:
    """A one-line error unless ``model``'s text tower can be fed embeddings and holds ``n_ctx`` learned tokens with
    room for a start token, a one-token name, '.' and an end token."""
    context = int(model.positional_embedding.shape[0]) if hasattr(model, "positional_embedding") else 0
    probe = torch.zeros(1, max(context, 2), dtype=torch.long)
    probe[0, 1] = 49407
    if context == 0 or short_context_length(model, probe) is None:
        raise ValueError(f"{method} feeds token embeddings to the text tower: a {type(model).__name__} cannot take "
                         "them (open_clip's CLIP with argmax or eos pooling and a causal mask only)")
    if n_ctx < 1 or n_ctx + 4 > context:
        raise ValueError(f"{method}: n_ctx {n_ctx} does not fit the text context of {context} tokens (it needs "
                         f"1 <= n_ctx <= {context - 4}: start token, context, a name, '.', end token)")


def check_prompts_fit(classes: ClassSet, prefix: str, n_ctx: int, context: int, method: str) -> None:
    """A one-line error naming the longest class whose prompt ``f"{prefix} {name}."`` is longer than ``context``."""
    if classes.tokenizer is None or not classes.names:
        return
    lengths = {name: len(_encode(classes.tokenizer, f"{prefix} {name.replace('_', ' ')}.")) + 2
               for name in classes.names}
    longest = max(lengths, key=lengths.get)
    if lengths[longest] > context:
        raise ValueError(f"{method}: with n_ctx {n_ctx} the prompt of class {longest!r} takes {lengths[longest]} "
                         f"tokens, more than the text context of {context}; use a smaller n_ctx")


def _order(n_ctx: int, length: int, name_lengths: Sequence[int], position: str) -> Optional[torch.Tensor]:
    """For each class, the position of the ``end`` layout ``[SOS][context][name …]`` each position of the ``middle``
    (``[SOS][context[:n//2]][name][context[n//2:]]``) or ``front`` (``[SOS][name][context]``) layout takes."""
    if position == "end":
        return None
    half = n_ctx // 2 if position == "middle" else 0
    rows = []
    for size in name_lengths:
        context, name = list(range(1, 1 + n_ctx)), list(range(1 + n_ctx, 1 + n_ctx + size))
        head = [0] + context[:half] + name + context[half:]
        rows.append(head + list(range(len(head), length)))
    return torch.tensor(rows, dtype=torch.long)


def class_prompts(model: nn.Module, classes: ClassSet, prefix: str, n_ctx: int, position: str = "end",
                  method: str = "the prompt learner") -> ClassPrompts:
    """The frozen side of ``classes``' prompts ``f"{prefix} {name}."`` (underscores read as spaces, as CoOp's
    trainers do) with ``n_ctx`` learned positions after the start token, on ``model``'s device."""
    if classes.tokenizer is None:
        raise ValueError(f"{method} tokenises prompts of its own: its classes need a tokenizer (ClassSet.of)")
    if position not in POSITIONS:
        raise ValueError(f"class_token_position must be one of {', '.join(POSITIONS)}, got {position!r}")
    device = model.token_embedding.weight.device
    names = [name.replace("_", " ") for name in classes.names]
    tokens = classes.tokenizer([f"{prefix} {name}." for name in names]).to(device)
    check_prompts_fit(classes, prefix, n_ctx, tokens.shape[1], method)
    with torch.no_grad():
        embeddings = model.token_embedding(tokens)
    order = _order(n_ctx, tokens.shape[1], [len(_encode(classes.tokenizer, name)) for name in names], position)
    return ClassPrompts(tuple(classes.names), tokens, embeddings, n_ctx, None if order is None else order.to(device))


def insert_context(prompts: ClassPrompts, context: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings (``… × n_cls × L × width``) with ``context`` (``… × n_cls × n_ctx × width``: expand a
    shared context first) in place of the learned positions of ``prompts``' layout."""
    lead = context.shape[:-3]
    frozen = prompts.embeddings.to(context.dtype)
    start = frozen[:, :1].expand(*lead, -1, -1, -1)
    rest = frozen[:, 1 + prompts.n_ctx:].expand(*lead, -1, -1, -1)
    assembled = torch.cat([start, context, rest], dim=-2)
    if prompts.order is None:
        return assembled
    index = prompts.order.expand(*lead, -1, -1)[..., None].expand(*assembled.shape)
    return assembled.gather(-2, index)


def prompt_features(model: nn.Module, prompts: ClassPrompts, embeddings: torch.Tensor) -> torch.Tensor:
    """Normalised fp32 text features (``… × n_cls × D``) of assembled prompt ``embeddings`` (``… × n_cls × L ×
    width``), in one pass of the text tower, pooled at each prompt's end token."""
    lead = embeddings.shape[:-3]
    flat = embeddings.reshape(-1, *embeddings.shape[-2:])
    tokens = prompts.tokens.repeat(flat.shape[0] // len(prompts), 1)
    features = F.normalize(encode_embeddings(model, flat, tokens).float(), dim=-1)
    return features.reshape(*lead, len(prompts), -1)


def phrase_embeddings(model: nn.Module, tokenizer, phrase: str, count: int) -> torch.Tensor:
    """The token embeddings at positions ``1 … count`` of the tokenised ``phrase`` (CoOp's ``ctx_init``), fp32."""
    device = model.token_embedding.weight.device
    with torch.no_grad():
        return model.token_embedding(tokenizer([phrase]).to(device))[0, 1:1 + count].float().clone()


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised fp32 features of ``images`` (the frozen image tower)."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


def logit_scale(model: nn.Module) -> torch.Tensor:
    """CLIP's learned-and-frozen ``logit_scale.exp()`` (100 for OpenAI's ViT-B/16), the scale CoOp's logits use."""
    return model.logit_scale.detach().exp().float()


@dataclass
class PromptState:
    """The class side of a ``ContextLearner``: the classes, their frozen prompts, and (unless the prompts depend on
    the image, CoCoOp) their normalised text features."""

    classes: ClassSet
    prompts: ClassPrompts
    features: Optional[torch.Tensor] = None


class ContextLearner(PromptLearner):
    """One learned context ``lora_context`` (``n_ctx × width``, or ``n_cls × n_ctx × width`` class-specific) fed
    to the text tower in each class prompt (``prefix`` and ``position`` say how); logits ``logit_scale.exp() ·
    cos(image, class)``. A subclass sets the tensor in ``__init__`` and says ``prefix(classes)``."""

    position = "end"

    def __init__(self, model, config, classes, support=None):
        super().__init__(model, config, classes, support)
        self._prompts: dict = {}  # frozen prompt layouts by class set (not saved: rebuilt from the names)

    @property
    def n_ctx(self) -> int:
        return int(self.lora_context.shape[-2])

    @property
    def class_specific(self) -> bool:
        return self.lora_context.dim() == 3

    def prefix(self, classes: ClassSet) -> str:
        """The text the learned positions replace, before each class name (CoOp: "X X … X" or its ctx_init)."""
        return " ".join(["X"] * self.n_ctx)

    @classmethod
    def check_fits(cls, model: nn.Module, config) -> None:
        """The context (``config.context_tokens``) leaves room in the text context (one line otherwise)."""
        check_context(model, config.context_tokens, cls.method_name)

    @classmethod
    def check_classes(cls, model: nn.Module, config, classes: ClassSet, training: ClassSet) -> None:
        """Every class prompt (``config.ctx_init`` or the placeholders, then the name) fits the text context."""
        prefix = config.ctx_init or " ".join(["X"] * config.context_tokens)
        check_prompts_fit(classes, prefix, config.context_tokens, int(model.positional_embedding.shape[0]),
                          cls.method_name)

    def prompts(self, model: nn.Module, classes: ClassSet) -> ClassPrompts:
        """``classes``' frozen prompt layout, built once per class set and device."""
        prefix = self.prefix(classes)
        key = (tuple(classes.names), prefix, str(model.token_embedding.weight.device))
        if key not in self._prompts:
            if self.class_specific and tuple(classes.names) != self.class_names:
                raise ValueError(f"{self.method_name} with csc learns one context per training class: it cannot "
                                 "score other classes (base-to-new's new classes, --eval_on datasets)")
            self._prompts[key] = class_prompts(model, classes, prefix, self.n_ctx, self.position, self.method_name)
        return self._prompts[key]

    def context(self, prompts: ClassPrompts) -> torch.Tensor:
        """The context of every class prompt, ``n_cls × n_ctx × width``."""
        if self.class_specific:
            return self.lora_context
        return self.lora_context.expand(len(prompts), -1, -1)

    def class_state(self, model: nn.Module, classes: ClassSet) -> PromptState:
        prompts = self.prompts(model, classes)
        return PromptState(classes, prompts, prompt_features(model, prompts, insert_context(prompts,
                                                                                            self.context(prompts))))

    def logits(self, model: nn.Module, images: torch.Tensor, state: PromptState) -> torch.Tensor:
        return logit_scale(model) * image_features(model, images) @ state.features.t()


def random_context(shape: Sequence[int], device=None) -> torch.Tensor:
    """CoOp's random context: N(0, 0.02²) from the global generator (seeded by the run)."""
    return nn.init.normal_(torch.empty(*shape, device=device), std=CONTEXT_STD)


def check_context_options(n_ctx: Optional[int], ctx_init: str) -> None:
    """One-line errors for a context of no token, or an init phrase that is not ``n_ctx`` tokens long."""
    if n_ctx is not None and n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    if n_ctx is not None and ctx_init and word_count(ctx_init) != n_ctx:
        relation = "more" if word_count(ctx_init) > n_ctx else "fewer"
        raise ValueError(f"ctx_init {ctx_init!r} is {word_count(ctx_init)} tokens, {relation} than n_ctx {n_ctx} "
                         "(the phrase sets the context length: leave n_ctx unset)")


def context_tokens(n_ctx: Optional[int], ctx_init: str, default: int) -> int:
    """``n_ctx`` as given, else the words of ``ctx_init``, else ``default``."""
    if n_ctx is not None:
        return n_ctx
    return word_count(ctx_init) if ctx_init else default


def initial_context(model: nn.Module, classes, phrase: str, shape: Sequence[int]) -> torch.Tensor:
    """The embeddings of ``phrase`` (CoOp's ``ctx_init``) or, without one, N(0, 0.02²); zeros when rebuilt from a
    checkpoint without a tokenizer (its tensors are loaded next)."""
    device = model.token_embedding.weight.device
    if not phrase:
        return random_context(shape, device)
    if classes.tokenizer is None:
        return torch.zeros(*shape, device=device)
    return phrase_embeddings(model, classes.tokenizer, phrase, shape[-2])
