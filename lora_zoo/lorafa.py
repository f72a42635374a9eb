"""LoRA-FA (Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv 2308.03303, 2023).

LoRA with the down-projection A frozen at its random (Kaiming-uniform) init and
only B (zeros at init) trained. Freezing A does not change what the layer
computes, so LoRA-FA is an optimizer builder here: ``lorafa`` freezes every
adapter's input-side tensors (``down_tensors``) — no gradient is computed for
them, which is LoRA-FA's memory saving — and trains the rest in one AdamW group.
It combines with any method whose layers have input-side tensors (not NoRA's
``nested_full``/``output_full`` structures: refused); the preset ``lorafa`` = LoRA layers (CLIP-LoRA
preset) + this optimizer, the baseline of the NoRA paper's Table 2. A is still
an adapter tensor (``lora_A``), saved with the checkpoint, so a loaded model
reproduces it exactly. Trainable parameters per LoRA matrix: ``r · d_out``.

Known difference to peft: peft's ``create_lorafa_optimizer`` also projects B's
gradient, ``g_B ← g_B (A Aᵀ + 10⁻⁸ I)⁺ / s²``, before an AdamW step (the "LoRA-FA
optimizer"); the paper's basic LoRA-FA, implemented here, trains B with plain
AdamW on its raw gradient. Forward and gradients equal peft's LoRA with A frozen.
"""
from __future__ import annotations

from torch import nn

from .adapter import adapter_modules
from .optim import register_optimizer, single_group
from .registry import register_preset


@register_optimizer("lorafa")
def lorafa_groups(model: nn.Module, lr: float, weight_decay: float, options=None) -> list[dict]:
    """Freeze every adapter's input-side factors; one group of what still trains."""
    adapters = adapter_modules(model)
    for layer_name, adapter in adapters.items():  # checked before anything is frozen
        if not adapter.down_tensors:
            raise ValueError(f"optimizer lorafa freezes input-side tensors, but {layer_name} ({adapter.method_name}) "
                             "has none, so nothing would be frozen (e.g. NoRA inner_structure nested_full or "
                             "output_full); use another optimizer or structure")
    for adapter in adapters.values():
        for name in adapter.down_tensors:
            getattr(adapter, name).requires_grad_(False)
    return single_group(model, lr, weight_decay)


# lr 2e-4: CLIP-LoRA's learning rate (LoRA-FA keeps LoRA's hyperparameters)
register_preset("lorafa", layer="lora", optimizer="lorafa", display_name="LoRA-FA",
                citation="Zhang et al., arXiv 2308.03303, 2023", lr=2e-4)
