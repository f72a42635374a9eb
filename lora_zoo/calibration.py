"""Calibration statistics: per-layer activation magnitudes of the frozen model.

METHODS.md, "Notation": run the frozen model on calibration inputs (few-shot
training images for the vision tower, class prompts for the text tower) and
record, for each target layer, the input channels' mean absolute value
``s_j = mean_tokens |x_j|`` and L2 norm ``n_j = ||X_{:,j}||₂`` and the output
channels' mean absolute value ``o_i = mean_tokens |z_i|``, plus the mean over
sequences of the output's L2 norm at the first position (``‖z_0‖₂``: the CLS
token for vision, the start token for text; the importance the authors' AIRA
rank allocation uses). Text padding tokens (those equal to the text tower's
``pad_id``) are excluded unless ``include_padding`` (the authors' NoRA/AIRA
calibration keeps them). Everything is gathered in one forward pass over the
batches, with hooks on the target linear layers; nothing per-token is kept.

``collect_token_stats`` does the same for any model that takes ``input_ids`` and
``attention_mask`` (a transformers causal LM, a BERT encoder), its targets named by module
patterns (``targets.match_modules``): positions whose attention mask is 0 (padding, on either
side) are left out, and the first-position statistic is taken at each sequence's first
unpadded token (position 0 would be padding under left padding).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .attention import split_attention
from .targets import find_target_linears, match_modules


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer (float32 CPU tensors)."""

    input_abs_mean: torch.Tensor   # s, (d_in,)
    input_l2: torch.Tensor         # n, (d_in,)
    output_abs_mean: torch.Tensor  # o, (d_out,)
    tokens: int
    first_token_output_l2: Optional[torch.Tensor] = None  # mean over sequences of ‖z_0‖₂, shape ()

    FIELDS = ("input_abs_mean", "input_l2", "output_abs_mean", "first_token_output_l2")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics that are present (checkpoints of older versions lack the first-token one)."""
        return {f: getattr(self, f) for f in self.FIELDS if getattr(self, f) is not None}


class _Accumulator:
    def __init__(self):
        self.abs_in = self.sq_in = self.abs_out = None
        self.tokens = 0
        self.first_norm_sum, self.sequences = 0.0, 0

    def update(self, x: torch.Tensor, z: torch.Tensor, valid: Optional[torch.Tensor],
               first: Optional[torch.Tensor] = None) -> None:
        if z.dim() == 3:  # (N, L, d_out), batch first: position 0 (or ``first``) of every sequence
            heads = z[:, 0] if first is None else z[torch.arange(z.shape[0], device=z.device), first]
            self.first_norm_sum += heads.detach().float().norm(dim=-1).sum().item()
            self.sequences += z.shape[0]
        x = x.detach().float().reshape(-1, x.shape[-1])
        z = z.detach().float().reshape(-1, z.shape[-1])
        if valid is not None:
            x, z = x[valid], z[valid]
        sums = (x.abs().sum(0), x.pow(2).sum(0), z.abs().sum(0))
        if self.abs_in is None:
            self.abs_in, self.sq_in, self.abs_out = sums
        else:
            self.abs_in += sums[0]
            self.sq_in += sums[1]
            self.abs_out += sums[2]
        self.tokens += x.shape[0]

    def result(self) -> LayerStats:
        count = max(self.tokens, 1)
        first = torch.tensor(self.first_norm_sum / self.sequences) if self.sequences else None
        return LayerStats(input_abs_mean=(self.abs_in / count).cpu(), input_l2=self.sq_in.sqrt().cpu(),
                          output_abs_mean=(self.abs_out / count).cpu(), tokens=self.tokens,
                          first_token_output_l2=first)


def _text_pad_id(model: nn.Module) -> Optional[int]:
    for owner in (model, getattr(model, "text", None)):
        if owner is not None and getattr(owner, "pad_id", None) is not None:
            return int(owner.pad_id)
    return 0  # open_clip's default tokenizer pads with 0


def _valid_tokens(tokens: torch.Tensor, pad_id: Optional[int], seq_len: int) -> torch.Tensor:
    """(N, seq_len) bool mask of non-padding positions; extra appended positions (CoCa cls) count as valid."""
    valid = tokens != pad_id if pad_id is not None else torch.ones_like(tokens, dtype=torch.bool)
    if seq_len > valid.shape[1]:
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], seq_len - valid.shape[1])], dim=1)
    return valid[:, :seq_len]


@contextmanager
def _recording(model: nn.Module, linears: Mapping[str, nn.Module]):
    """Forward hooks feeding each of ``linears`` (name → module) to its ``_Accumulator``, the model in eval mode.
    Yields ``(accumulators, state, device)``: set ``state["valid"]`` (and ``state["first"]``) before each forward.
    The hooks are removed and the training mode restored on exit, also after an error."""
    accumulators = {name: _Accumulator() for name in linears}
    state: dict = {"valid": None, "first": None}

    def hook_for(name):
        def hook(module, inputs, output):
            accumulators[name].update(inputs[0], output, state["valid"], state["first"])
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in linears.items()]
    was_training = model.training
    model.eval()
    try:
        yield accumulators, state, next(model.parameters()).device
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _results(accumulators: Mapping[str, "_Accumulator"]) -> dict[str, LayerStats]:
    missing = [name for name, acc in accumulators.items() if acc.tokens == 0]
    if missing:
        raise RuntimeError(f"no calibration tokens reached {missing[0]} ({len(missing)} layers)")
    return {name: acc.result() for name, acc in accumulators.items()}


@torch.no_grad()
def collect_activation_stats(model: nn.Module, image_batches: Optional[Iterable[torch.Tensor]] = None,
                             text_batches: Optional[Iterable[torch.Tensor]] = None,
                             targets=("q", "k", "v"), layers=None, include_padding: bool = False) -> dict[str, LayerStats]:
    """Per-layer ``LayerStats`` for the targets of the vision tower (from ``image_batches``) and of the
    text tower (from ``text_batches`` of token ids; padding excluded unless ``include_padding``).
    Splits attention first if needed.

    Returns ``{qualified layer name: LayerStats}`` with the names ``apply_adapters`` uses.
    """
    encoders = tuple(e for e, batches in (("vision", image_batches), ("text", text_batches)) if batches is not None)
    if not encoders:
        raise ValueError("collect_activation_stats needs image_batches and/or text_batches")
    split_attention(model, encoders)
    with _recording(model, find_target_linears(model, encoders, targets, layers)) as (accumulators, state, device):
        if image_batches is not None:
            for images in image_batches:
                state["valid"] = None
                model.encode_image(images.to(device))
        if text_batches is not None:
            pad_id = None if include_padding else _text_pad_id(model)
            for tokens in text_batches:
                tokens = tokens.to(device)
                seq_len = tokens.shape[1] + (1 if getattr(model, "cls_emb", None) is not None else 0)
                state["valid"] = _valid_tokens(tokens, pad_id, seq_len).reshape(-1)
                model.encode_text(tokens)
    return _results(accumulators)


TokenBatch = Union[Mapping[str, torch.Tensor], tuple]


@torch.no_grad()
def collect_token_stats(model: nn.Module, batches: Iterable[TokenBatch], targets: Iterable[str],
                        include_padding: bool = False) -> dict[str, LayerStats]:
    """Per-layer ``LayerStats`` of the modules ``targets`` (patterns) name, from ``model(input_ids=...,
    attention_mask=...)`` on each batch: a mapping with those keys, or an ``(input_ids, attention_mask)`` pair.
    Positions with mask 0 are excluded unless ``include_padding``; the first-position statistic is each sequence's
    first unpadded token. Returns ``{qualified module name: LayerStats}``, the names ``apply_adapters`` uses."""
    with _recording(model, match_modules(model, targets)) as (accumulators, state, device):
        for batch in batches:
            ids, mask = (batch["input_ids"], batch.get("attention_mask")) if isinstance(batch, Mapping) else batch
            ids = ids.to(device)
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            state["valid"] = None if include_padding else mask.reshape(-1).bool()
            state["first"] = None if include_padding else mask.long().argmax(dim=1)
            model(input_ids=ids, attention_mask=mask)
    return _results(accumulators)
