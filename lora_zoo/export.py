"""Export an adapted model as a plain open_clip state dict (loadable with no lora_zoo installed).

``fused_state_dict(model)`` folds every adapter's ΔW (and Δb) into its weight
(the effective weight ``W_frozen + ΔW(θ)``, whether or not the adapter is merged,
through ``adapter.apply_delta``)
and undoes ``split_attention``: the q/k/v weights and biases of each
``SplitAttention`` are concatenated back into ``attn.in_proj_weight`` /
``attn.in_proj_bias`` and ``o`` becomes ``attn.out_proj`` — the fused layout
of ``nn.MultiheadAttention`` and open_clip's ``Attention``. The result has
exactly the keys of the plain open_clip model, so
``open_clip.create_model(name, pretrained=path)`` or ``load_state_dict`` on a
fresh model reproduces the adapted model's outputs. The model is not modified.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .adapter import AdapterLinear, apply_delta
from .attention import SplitAttention
from .files import atomic_write, torch_save
from .kinds import refuse_without_weight_update
from .naming import is_adapter_tensor


@torch.no_grad()
def fused_state_dict(model: nn.Module, reference: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """A plain open_clip state dict of ``model`` with adapters folded in and attention fused again.

    With ``reference`` (a fresh plain model of the same architecture), the keys and shapes are checked
    against it and a one-line ``ValueError`` names the first difference.
    """
    refuse_without_weight_update(model, "folded into plain open_clip weights")
    state = {}
    for name, tensor in model.state_dict().items():
        if not is_adapter_tensor(name):
            state[name.replace(".base_layer.", ".")] = tensor.detach().clone()
    for name, adapter in ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)):
        if not adapter.mergeable:
            raise ValueError(f"{name}: {adapter.method_name} with this config depends on the batch and cannot be "
                             "folded into a plain open_clip checkpoint")
        if not adapter.merged:  # the state's tensors are copies: the update goes into them, not the model
            apply_delta(state[f"{name}.weight"], state.get(f"{name}.bias"), *adapter.delta())
    for name, attn in ((n, m) for n, m in model.named_modules() if isinstance(m, SplitAttention)):
        prefix = f"{name}." if name else ""
        state[prefix + "in_proj_weight"] = torch.cat([state.pop(f"{prefix}{p}.weight") for p in "qkv"])
        if f"{prefix}q.bias" in state:
            state[prefix + "in_proj_bias"] = torch.cat([state.pop(f"{prefix}{p}.bias") for p in "qkv"])
        state[prefix + "out_proj.weight"] = state.pop(prefix + "o.weight")
        if prefix + "o.bias" in state:
            state[prefix + "out_proj.bias"] = state.pop(prefix + "o.bias")
    if reference is not None:
        expected = reference.state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"fused state dict {'lacks ' + missing[0] if missing else 'has extra ' + extra[0]} "
                             f"({len(missing)} missing, {len(extra)} extra keys) compared with the plain model")
        for key, value in expected.items():
            if value.shape != state[key].shape:
                raise ValueError(f"fused {key} has shape {tuple(state[key].shape)}, the plain model {tuple(value.shape)}")
        state = {key: state[key] for key in expected}  # the plain model's key order
    return state


def export_merged(model: nn.Module, path, reference: Optional[nn.Module] = None) -> Path:
    """Write ``fused_state_dict(model)`` with ``torch.save`` (atomically) to ``path``; returns the path."""
    state = {k: v.detach().cpu().contiguous() for k, v in fused_state_dict(model, reference).items()}
    path = Path(path)
    atomic_write(path, lambda tmp: torch_save(state, tmp))  # a full disk: one line naming path
    return path
