"""LoRA-FA (Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv 2308.03303, 2023).

LoRA with the down-projection A frozen at its random (Kaiming-uniform) init and
only B (zeros at init) trained: ``ΔW = s · B A``. A is still an adapter tensor
(``lora_A``), so it is saved and a loaded model reproduces it exactly.
Trainable parameters per matrix: ``r · d_out``.
"""
from __future__ import annotations


from torch import nn

from .lora import LoraConfig, LoraLinear
from .registry import register_method


@register_method("lorafa")
class LoraFaLinear(LoraLinear):
    config_class = LoraConfig

    def __init__(self, base_layer: nn.Linear, config: LoraConfig, stats=None):
        super().__init__(base_layer, config, stats)
        self.lora_A.requires_grad_(False)
