"""Split open_clip's fused attention into separate q/k/v/o linear layers, once.

open_clip's residual blocks hold either ``nn.MultiheadAttention`` (one fused
``in_proj_weight`` of shape 3d × d) or, for ``block_type="custom"`` configs,
open_clip's own ``Attention`` class (same fused layout). Adapters need one
``nn.Linear`` per projection, so ``split_attention(model)`` replaces each such
module with ``SplitAttention``: four ``nn.Linear`` layers holding the same
numbers, and ``torch.nn.functional.scaled_dot_product_attention`` for the
attention itself. It keeps each original module's call signature, so the
surrounding open_clip block code runs unchanged; a test checks the split
model equals the original (vision and text towers).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # open_clip's own attention class (custom blocks); absent in some versions
    from open_clip.transformer import Attention as OpenClipAttention
except ImportError:  # pragma: no cover - depends on the installed open_clip
    OpenClipAttention = None


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)
    return layer


class SplitAttention(nn.Module):
    """Multi-head self/cross attention with explicit ``q``, ``k``, ``v``, ``o`` linears.

    ``mha_style=True`` mimics ``nn.MultiheadAttention.forward`` (returns ``(out, None)``,
    honours ``batch_first``); otherwise it mimics open_clip's ``Attention`` (``forward(x,
    attn_mask)``, batch first, optional q/k norms, head scale and inner norm kept as the
    original modules). The projections always see batch-first ``(N, L, D)`` tensors.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, num_heads: int,
                 batch_first: bool = True, dropout: float = 0.0, mha_style: bool = True,
                 ln_q: Optional[nn.Module] = None, ln_k: Optional[nn.Module] = None,
                 ln_inner: Optional[nn.Module] = None, head_scale: Optional[nn.Parameter] = None,
                 out_drop: Optional[nn.Module] = None):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.mha_style = mha_style
        self.ln_q = ln_q or nn.Identity()
        self.ln_k = ln_k or nn.Identity()
        self.ln_inner = ln_inner or nn.Identity()
        self.head_scale = head_scale
        self.out_drop = out_drop or nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, -1).transpose(1, 2)

    @staticmethod
    def _mask(attn_mask, key_padding_mask, n, heads, dtype):
        mask = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
            else:
                mask = attn_mask.to(dtype)
            if mask.dim() == 3:  # (N·H, L, S) -> (N, H, L, S)
                mask = mask.reshape(n, heads, *mask.shape[-2:])
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
            pad = pad.masked_fill(key_padding_mask.bool(), float("-inf"))[:, None, None, :]
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None,
                key_padding_mask=None, **unused):
        if need_weights and self.mha_style:
            raise NotImplementedError("SplitAttention does not return attention weights (need_weights=True)")
        key = query if key is None else key
        value = key if value is None else value
        if self.mha_style and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, dim = query.shape
        q = self.ln_q(self._heads(self.q(query)))
        k = self.ln_k(self._heads(self.k(key)))
        v = self._heads(self.v(value))
        mask = self._mask(attn_mask, key_padding_mask, n, self.num_heads, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        if self.head_scale is not None:
            out = out * self.head_scale
        out = self.o(self.ln_inner(out.transpose(1, 2).reshape(n, length, dim)))
        out = self.out_drop(out)
        if self.mha_style:
            if not self.batch_first:
                out = out.transpose(0, 1)
            return out, None
        return out


def _split_mha(attn: nn.MultiheadAttention) -> SplitAttention:
    if not attn._qkv_same_embed_dim:
        raise ValueError("cannot split nn.MultiheadAttention with kdim/vdim different from embed_dim")
    weights = attn.in_proj_weight.chunk(3, dim=0)
    biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    if attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError("cannot split nn.MultiheadAttention with add_bias_kv or add_zero_attn")
    q, k, v = (_linear(w, b) for w, b in zip(weights, biases))
    o = _linear(attn.out_proj.weight, attn.out_proj.bias)
    return SplitAttention(q, k, v, o, attn.num_heads, batch_first=attn.batch_first,
                          dropout=attn.dropout, mha_style=True)


def _split_open_clip(attn) -> SplitAttention:
    if attn.logit_scale is not None:
        raise ValueError("cannot split open_clip Attention with scaled_cosine=True (cosine attention is not plain SDPA)")
    weights = attn.in_proj_weight.chunk(3, dim=0)
    biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    q, k, v = (_linear(w, b) for w, b in zip(weights, biases))
    o = _linear(attn.out_proj.weight, attn.out_proj.bias)
    return SplitAttention(q, k, v, o, attn.num_heads, batch_first=True, dropout=attn.attn_drop.p,
                          mha_style=False, ln_q=attn.ln_q, ln_k=attn.ln_k, ln_inner=attn.ln_inner,
                          head_scale=attn.head_scale, out_drop=attn.out_drop)


def split_attention_module(attn: nn.Module) -> SplitAttention:
    """A ``SplitAttention`` equal to ``attn``; a clear error for unsupported attention classes."""
    if isinstance(attn, SplitAttention):
        return attn
    if isinstance(attn, nn.MultiheadAttention):
        return _split_mha(attn).train(attn.training)
    if OpenClipAttention is not None and isinstance(attn, OpenClipAttention):
        return _split_open_clip(attn).train(attn.training)
    raise TypeError(
        f"cannot split attention of type {type(attn).__module__}.{type(attn).__name__}; "
        "expected torch.nn.MultiheadAttention or open_clip.transformer.Attention"
    )


def encoder_blocks(model: nn.Module, encoder: str) -> tuple[str, nn.ModuleList]:
    """(qualified name, residual blocks) of the ``"vision"`` or ``"text"`` transformer of an open_clip model."""
    if encoder == "vision":
        trunk = getattr(getattr(model, "visual", None), "transformer", None)
        prefix = "visual.transformer"
    elif encoder == "text":
        if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):
            trunk, prefix = model.transformer, "transformer"
        else:  # CustomTextCLIP keeps the text tower under .text
            trunk, prefix = getattr(getattr(model, "text", None), "transformer", None), "text.transformer"
    else:
        raise ValueError(f"unknown encoder {encoder!r}; expected 'vision' or 'text'")
    blocks = getattr(trunk, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"model has no open_clip {encoder} transformer ({prefix}.resblocks); expected an open_clip CLIP model "
            "with a ViT image tower and a transformer text tower"
        )
    return prefix + ".resblocks", blocks


def split_attention(model: nn.Module, encoders=("vision", "text")) -> nn.Module:
    """Replace the fused attention of every residual block of ``encoders`` by ``SplitAttention``, in place.

    Idempotent: already split blocks are left alone. Returns ``model``.
    """
    for encoder in encoders:
        _, blocks = encoder_blocks(model, encoder)
        for block in blocks:
            if not hasattr(block, "attn"):
                raise TypeError(f"open_clip block {type(block).__name__} has no .attn to split")
            block.attn = split_attention_module(block.attn)
    return model
