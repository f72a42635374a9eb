"""Learned tokens put into open_clip's towers by forward pre-hooks, and the class prompts they stand in.

MaPLe (Khattak et al., CVPR 2023) and PLOT++ (Chen et al., ICLR 2023) feed learned tokens to the image
tower between its positional embedding and ``ln_pre``; MaPLe also swaps, at each of the first blocks of
both towers, the tokens that the previous block made of its prompts for new ones (deep prompts).
open_clip's towers have no input for either, so instead of copying their forward code a learner
registers a ``TokenSlot`` as a forward pre-hook on the module whose input changes:

- ``append`` on the vision tower's ``ln_pre``: its input ``B × L × W`` becomes ``S·B × (L + n) × W``,
  each of the S sets of n tokens appended after the patch tokens, set-major (row ``s·B + b``): S = 1
  for MaPLe; PLOT++'s M sets are M passes of the tower, run as one batch (the output is ``M·B × D``);
- ``replace_last`` on a vision block: the last n tokens of its input replaced by n tokens;
- ``replace_after_first`` on a text block: tokens 1..n (after the start token) replaced.

A slot is empty, and its hook passes the input through, except inside ``TowerPrompts.filled``: the
model's other uses (the zero-shot pass, ``encode_image`` anywhere else) see the plain towers.
``TowerPrompts.remove`` takes a learner's hooks off the model. The text side's first prompt is not a
hook: ``context_prompts`` tokenises ``"<prefix> <name>."`` and the learner puts its tokens in place of
the prefix's first n embeddings before ``text.encode_embeddings`` (CoOp's layout).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

PLACES = ("append", "replace_last", "replace_after_first")


class TokenSlot:
    """A forward pre-hook that puts ``tokens`` into its module's input while they are set (None: no change)."""

    def __init__(self, place: str, batch_first: bool = True):
        if place not in PLACES:
            raise ValueError(f"unknown token place {place!r}; expected one of {', '.join(PLACES)}")
        self.place, self.batch_first = place, batch_first
        self.tokens: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: tuple):
        if self.tokens is None:
            return None
        x = args[0] if self.batch_first else args[0].transpose(0, 1)
        x = self.insert(x, self.tokens.to(x.dtype))
        return (x if self.batch_first else x.transpose(0, 1), *args[1:])

    def insert(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``x`` (batch × length × width) with ``tokens`` in place (``append``: sets × n × width)."""
        batch, length, width = x.shape
        if self.place == "append":
            sets, count = tokens.shape[:2]
            grown = torch.cat([x.expand(sets, batch, length, width), tokens[:, None].expand(sets, batch, count, width)],
                              dim=2)
            return grown.reshape(sets * batch, length + count, width)
        count = tokens.shape[0]
        tokens = tokens.expand(batch, count, width)
        if self.place == "replace_last":
            return torch.cat([x[:, :length - count], tokens], dim=1)
        return torch.cat([x[:, :1], tokens, x[:, 1 + count:]], dim=1)


class TowerPrompts:
    """A learner's token slots on one model: registered with ``add``, filled for one encoding, removed."""

    def __init__(self):
        self.slots: list[TokenSlot] = []
        self.handles: list = []

    def add(self, module: nn.Module, place: str, batch_first: bool = True) -> TokenSlot:
        slot = TokenSlot(place, batch_first)
        self.handles.append(module.register_forward_pre_hook(slot))
        self.slots.append(slot)
        return slot

    @contextlib.contextmanager
    def filled(self, contents: Mapping[TokenSlot, torch.Tensor]):
        """Each slot holds its tokens for the duration of the block, then is empty again (also on an error)."""
        try:
            for slot, tokens in contents.items():
                slot.tokens = tokens
            yield
        finally:
            for slot in contents:
                slot.tokens = None

    def remove(self) -> None:
        """Take every hook off the model (the towers compute what they computed before the learner)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.slots = [], []


def tower_blocks(model: nn.Module, encoder: str) -> tuple[nn.ModuleList, bool]:
    """(residual blocks, batch_first) of the ``"vision"`` or ``"text"`` transformer of open_clip's ``CLIP``."""
    trunk = getattr(getattr(model, "visual", None), "transformer", None) if encoder == "vision" else \
        getattr(model, "transformer", None)
    return getattr(trunk, "resblocks", None), getattr(trunk, "batch_first", True)


def check_prompt_towers(model: nn.Module, method: str) -> tuple[int, int]:
    """A one-line error unless both towers take prompts as these learners put them (a ViT pooled at its class
    token, ``ln_pre`` after the positional embedding; open_clip's CLIP text transformer); their block counts."""
    visual = getattr(model, "visual", None)
    if not isinstance(getattr(visual, "ln_pre", None), nn.Module) or getattr(visual, "attn_pool", None) is not None \
            or getattr(visual, "pool_type", None) != "tok" or not isinstance(tower_blocks(model, "vision")[0],
                                                                             nn.ModuleList):
        raise ValueError(f"{method} puts prompt tokens into open_clip's ViT image tower pooled at its class token; "
                         f"{type(visual).__name__} is not one")
    if not isinstance(tower_blocks(model, "text")[0], nn.ModuleList) or not hasattr(model, "token_embedding") \
            or not hasattr(model, "attn_mask"):
        raise ValueError(f"{method} feeds embeddings to open_clip's CLIP text tower; {type(model).__name__} has none")
    return len(tower_blocks(model, "vision")[0]), len(tower_blocks(model, "text")[0])


def context_length(model: nn.Module) -> int:
    return int(model.positional_embedding.shape[0])


def context_prompts(tokenizer: Optional[Callable], texts: Sequence[str], length: int, method: str) -> torch.Tensor:
    """Token ids of ``texts`` (``"<prefix> <name>."``), refused in one line when one does not fit ``length`` tokens
    (a tokenizer cuts it silently: the class name would be lost)."""
    if tokenizer is None:
        raise ValueError(f"{method} builds its prompts from the class names: give the classes with their tokenizer "
                         "(lz.ClassSet.of)")
    encode = getattr(tokenizer, "encode", None)
    for text in texts:
        if encode is not None and len(encode(text)) + 2 > length:  # + start and end tokens
            raise ValueError(f"{method} prompt {text!r} is longer than the text context of {length} tokens")
    tokens = tokenizer(list(texts))
    if tokens.shape[1] != length:
        raise ValueError(f"{method}: the tokenizer gives {tokens.shape[1]} positions, the text tower has {length}")
    return tokens
