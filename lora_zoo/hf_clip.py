"""An open_clip CLIP as transformers' ``CLIPModel``: the same numbers in the other library's layout.

``to_hf_clip(model)`` builds a ``transformers.CLIPModel`` (config and weights) that
computes what open_clip's ``encode_image`` / ``encode_text`` compute
(``get_image_features`` / ``get_text_features``, before normalisation):

- q/k/v weights and biases split from the fused in-projection (``nn.MultiheadAttention``,
  open_clip's ``Attention``) or taken from ``SplitAttention``'s q/k/v linears; the
  out-projection, ``mlp.c_fc`` / ``mlp.c_proj`` as ``out_proj``, ``fc1`` / ``fc2``;
- the image and text projections transposed (open_clip keeps them as ``x @ P``);
- the activation of the MLPs (``quick_gelu`` for OpenAI's weights, ``gelu`` for
  open_clip's default ``nn.GELU``), the LayerNorm epsilon, class and positional embeddings,
  ``ln_pre`` / ``ln_post`` / ``ln_final``, the logit scale;
- text pooling as open_clip pools: its default ``argmax`` (the token with the largest id,
  the end token of its tokenizer) is transformers' ``eos_token_id = 2``, the value its
  CLIPTextTransformer reads as "argmax" (and OpenAI's converted configs carry);
  ``pool_type="eos"`` becomes ``eos_token_id = eos_id``.

A model with lora_zoo adapters converts to its *pretrained* model: each adapter's
``original_weight()`` and its bias as built (whether merged or not), so a peft
adapter from ``peft_export.export_peft`` on top reproduces the adapted model.
An architecture transformers' CLIP cannot represent exactly is refused with one
``ValueError`` naming the feature (``convertible_config`` checks without building
anything). transformers is imported only by ``to_hf_clip``. ``save_hf_clip(model, folder)`` writes the
converted model with ``save_pretrained`` as our other files are written: readable by others, a failed
write (a full disk) one line naming the folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer
from torch import nn

from .adapter import AdapterLinear
from .attention import OpenClipAttention, SplitAttention
from .files import share, write_error

INSTALL = "pip install peft transformers"
#: transformers' CLIPTextTransformer pools by argmax of the token ids when eos_token_id is 2
ARGMAX_EOS_ID = 2


class NotRepresentable(ValueError):
    """The open_clip model has a feature transformers' CLIPModel cannot represent exactly."""


def _refuse(feature: str):
    raise NotRepresentable(f"cannot convert to transformers' CLIPModel exactly: this open_clip model has {feature}")


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text tower's parts: the CLIP itself, or a CustomTextCLIP's ``.text``."""
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        return model
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return text
    if text is not None:
        _refuse(f"a {type(text).__name__} text tower (transformers' CLIP has its own text transformer)")
    raise TypeError(f"expected an open_clip CLIP model, got {type(model).__name__}")


def _layer_norm_eps(norm: nn.Module, where: str) -> float:
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        _refuse(f"{type(norm).__name__} as {where} (transformers' CLIP uses an affine LayerNorm)")
    return float(norm.eps)


def _activation(module: nn.Module) -> str:
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[module.approximate]
    _refuse(f"the MLP activation {type(module).__name__} (transformers' CLIP has quick_gelu, gelu, gelu tanh)")


def _attention_heads(attn: nn.Module) -> int:
    """The head count of a plain attention module; refuses the extras of open_clip's custom blocks."""
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
            _refuse("attention with add_bias_kv, add_zero_attn or kdim/vdim")
        return attn.num_heads
    if isinstance(attn, SplitAttention) or (OpenClipAttention is not None and isinstance(attn, OpenClipAttention)):
        if getattr(attn, "logit_scale", None) is not None:
            _refuse("scaled cosine attention (scaled_cosine_attn)")
        if not (_is_identity(attn.ln_q) and _is_identity(attn.ln_k)):
            _refuse("LayerNorms on queries and keys (qk_norm)")
        if not _is_identity(attn.ln_inner):
            _refuse("a LayerNorm inside attention (scale_attn_inner)")
        if attn.head_scale is not None:
            _refuse("per-head output scales (scale_heads)")
        return attn.num_heads
    _refuse(f"attention of type {type(attn).__name__}")


def _check_plain_block(block: nn.Module) -> None:
    """Refuse what a transformers CLIP encoder layer (pre-norm attention and MLP, nothing else) lacks."""
    for attr, feature in (("ls_1", "layer scale (ls_init_value)"), ("ls_2", "layer scale (ls_init_value)"),
                          ("ln_attn", "a LayerNorm after attention (scale_attn)")):
        if not _is_identity(getattr(block, attr, None)):
            _refuse(feature)
    if hasattr(block, "ln_1_kv"):
        _refuse("cross-attention blocks")
    if not _is_identity(getattr(block.mlp, "ln", None)):
        _refuse("a LayerNorm inside the MLP (scale_fc)")


def _tower_config(blocks: nn.ModuleList, norms: dict[str, nn.Module]) -> dict[str, Any]:
    """Encoder fields of one tower's transformers config: its blocks must be plain and alike."""
    if len(blocks) == 0:
        _refuse("a tower without transformer blocks")
    shapes, eps = set(), {_layer_norm_eps(norm, where) for where, norm in norms.items()}
    for block in blocks:
        _check_plain_block(block)
        eps |= {_layer_norm_eps(block.ln_1, "ln_1"), _layer_norm_eps(block.ln_2, "ln_2")}
        shapes.add((block.ln_1.normalized_shape[0], _attention_heads(block.attn), _activation(block.mlp.gelu),
                    _linear_of(block.mlp.c_fc).out_features))
    if len(shapes) != 1:
        _refuse("blocks that differ in width, heads, activation or MLP width")
    if len(eps) != 1:
        _refuse(f"LayerNorms with different epsilons ({', '.join(map(str, sorted(eps)))})")
    width, heads, act, mlp_width = shapes.pop()
    return dict(hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=len(blocks),
                num_attention_heads=heads, hidden_act=act, layer_norm_eps=eps.pop())


def _linear_of(module: nn.Module) -> nn.Linear:
    return module.base_layer if isinstance(module, AdapterLinear) else module


def _vision_config(visual: nn.Module) -> dict[str, Any]:
    if not isinstance(visual, VisionTransformer):
        _refuse(f"a {type(visual).__name__} image tower (transformers' CLIP has a ViT)")
    if visual.attn_pool is not None:
        _refuse("attentional pooling in the image tower (attentional_pool)")
    if visual.pool_type != "tok":
        _refuse(f"image pooling {visual.pool_type!r} (transformers' CLIP pools the class token, 'tok')")
    if _is_identity(visual.ln_pre):
        _refuse("no LayerNorm before the image transformer (no_ln_pre)")
    if visual.proj is None:
        _refuse("no image projection")
    (height, width), (patch_h, patch_w) = visual.image_size, visual.patch_size
    if height != width or patch_h != patch_w:
        _refuse(f"a non-square image or patch size ({height}×{width}, {patch_h}×{patch_w})")
    config = _tower_config(visual.transformer.resblocks, {"ln_pre": visual.ln_pre, "ln_post": visual.ln_post})
    return dict(config, num_channels=visual.conv1.in_channels, image_size=int(height), patch_size=int(patch_h),
                projection_dim=visual.proj.shape[1])


def _text_config(model: nn.Module) -> dict[str, Any]:
    text = text_tower(model)
    if getattr(text, "cls_emb", None) is not None:
        _refuse("a text class token (embed_cls)")
    if getattr(text, "attn_mask", None) is None:
        _refuse("no causal mask in the text tower (no_causal_mask)")
    projection = text.text_projection
    if projection is None:
        _refuse("no text projection")
    if isinstance(projection, nn.Linear) and projection.bias is not None:
        _refuse("a bias in the text projection (proj_bias)")
    pool = text.text_pool_type if text is model else text.pool_type
    eos_id = text.text_eos_id if text is model else text.eos_id
    if pool == "argmax":
        eos_token_id = ARGMAX_EOS_ID
    elif pool == "eos" and eos_id != ARGMAX_EOS_ID:
        eos_token_id = eos_id
    else:
        _refuse(f"text pooling {pool!r}" + (f" with eos_id {eos_id} (transformers reads eos_token_id 2 as argmax)"
                                            if pool == "eos" else " (transformers pools the end token)"))
    config = _tower_config(text.transformer.resblocks, {"ln_final": text.ln_final})
    projection_dim = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]
    context, _ = text.positional_embedding.shape
    return dict(config, vocab_size=text.token_embedding.num_embeddings, max_position_embeddings=context,
                projection_dim=projection_dim, eos_token_id=eos_token_id)


def convertible_config(model: nn.Module) -> dict[str, Any]:
    """The ``CLIPConfig`` keyword arguments for ``model``; a one-line ``ValueError`` for what cannot convert.

    Needs no transformers: it only reads the open_clip model.
    """
    if not hasattr(model, "visual"):
        raise TypeError(f"expected an open_clip CLIP model (with .visual), got {type(model).__name__}")
    vision, text = _vision_config(model.visual), _text_config(model)
    if getattr(model, "logit_bias", None) is not None:
        _refuse("a logit bias (init_logit_bias, SigLIP-style)")
    if vision["projection_dim"] != text["projection_dim"]:
        _refuse(f"image and text embeddings of different widths ({vision['projection_dim']}, "
                f"{text['projection_dim']})")
    # the logit scale is a weight (hf_clip_state_dict), not part of the config
    return dict(vision_config=vision, text_config=text, projection_dim=vision["projection_dim"])


@torch.no_grad()
def pretrained_linear(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` of a linear layer as pretrained: an adapter's original weight and bias as built."""
    if not isinstance(module, AdapterLinear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    bias = module.base_layer.bias
    if bias is not None:
        bias = bias.detach()
        extra = module.extra_bias()
        if module.merged and extra is not None:  # merging folded the extra bias in (the authors' NoRA)
            bias = bias - extra.to(bias.dtype)
    return module.original_weight(), bias


def _attention_projections(attn: nn.Module) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``{q_proj, k_proj, v_proj, out_proj: (weight, bias)}`` of one attention module, pretrained."""
    if isinstance(attn, SplitAttention):
        return {f"{p}_proj": pretrained_linear(getattr(attn, p)) for p in "qkv"} | {
            "out_proj": pretrained_linear(attn.o)}
    weights = attn.in_proj_weight.detach().chunk(3)
    biases = attn.in_proj_bias.detach().chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    return {f"{p}_proj": (w, b) for p, w, b in zip("qkv", weights, biases)} | {
        "out_proj": pretrained_linear(attn.out_proj)}


def _norm_state(prefix: str, norm: nn.LayerNorm) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": norm.weight.detach(), f"{prefix}.bias": norm.bias.detach()}


def _linear_state(prefix: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def _encoder_state(prefix: str, blocks: nn.ModuleList) -> dict[str, torch.Tensor]:
    state = {}
    for index, block in enumerate(blocks):
        layer = f"{prefix}.encoder.layers.{index}"
        state |= _norm_state(f"{layer}.layer_norm1", block.ln_1) | _norm_state(f"{layer}.layer_norm2", block.ln_2)
        for name, (weight, bias) in _attention_projections(block.attn).items():
            state |= _linear_state(f"{layer}.self_attn.{name}", weight, bias)
        state |= _linear_state(f"{layer}.mlp.fc1", *pretrained_linear(block.mlp.c_fc))
        state |= _linear_state(f"{layer}.mlp.fc2", *pretrained_linear(block.mlp.c_proj))
    return state


@torch.no_grad()
def hf_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s pretrained weights under transformers' ``CLIPModel`` names (float32 CPU copies)."""
    visual = model.visual
    text = text_tower(model)
    projection = text.text_projection
    text_projection = projection.weight if isinstance(projection, nn.Linear) else projection.t()
    state = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "visual_projection.weight": visual.proj.t(),
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        "text_projection.weight": text_projection,
        "logit_scale": model.logit_scale.reshape(()),
    }
    state |= _norm_state("vision_model.pre_layrnorm", visual.ln_pre)
    state |= _norm_state("vision_model.post_layernorm", visual.ln_post)
    state |= _norm_state("text_model.final_layer_norm", text.ln_final)
    state |= _encoder_state("vision_model", visual.transformer.resblocks)
    state |= _encoder_state("text_model", text.transformer.resblocks)
    return {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()}


def to_hf_clip(model: nn.Module):
    """A ``transformers.CLIPModel`` (float32, CPU, eval mode) computing what the open_clip ``model`` computes
    with its pretrained weights (adapters left out: put them on with peft, ``export_peft``)."""
    config_values = convertible_config(model)
    try:
        from transformers import CLIPConfig, CLIPModel
    except ImportError:
        raise ImportError(f"to_hf_clip needs transformers ({INSTALL})") from None
    hf_model = CLIPModel(CLIPConfig(**config_values))
    hf_model.load_state_dict(hf_clip_state_dict(model), strict=True)
    return hf_model.eval()


def save_hf_clip(model: nn.Module, folder) -> Path:
    """``to_hf_clip(model).save_pretrained(folder)``, its files readable by others (transformers writes the weights
    0600) and a failed write one ``files.WriteError`` naming ``folder`` (transformers lets safetensors' own error
    type through for a full disk); returns ``folder``."""
    folder, hf_model = Path(folder), to_hf_clip(model)
    try:
        hf_model.save_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - safetensors' error type is no OSError
        failure = write_error(folder, err)
        if failure is None:
            raise
        raise failure from None
    for path in folder.rglob("*"):
        if path.is_file():
            share(path)
    return folder
