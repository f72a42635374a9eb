"""lora_zoo: LoRA, NoRA and AIRA (ICCV 2025) and their baselines as adapters on open_clip CLIP models.

Public API::

    list_methods()                     registered method names
    wrap_linear(linear, method, stats=None, **cfg)
    apply_adapters(model, method, encoders=("vision", "text"), targets=("q", "k", "v"),
                   layers=None, stats=None, **cfg)          -> {layer name: adapter}
    collect_activation_stats(model, image_batches=None, text_batches=None, targets=...)
    trainable_parameters(model), count_trainable(model)
    merge_adapters(model), unmerge_adapters(model)
    save_adapters(model, path), load_adapters(model, path)

The method registry: each import below registers one method (``@register_method``).
"""
__version__ = "0.1.0"

from .adapter import AdapterConfig, AdapterLinear, is_adapter_tensor
from .attention import SplitAttention, split_attention
from .calibration import LayerStats, collect_activation_stats
from .hooks import TrainingHooks, param_groups, training_hooks
from .checkpoint import load_adapters, read_adapter_config, save_adapters
from .inject import (adapter_modules, adapter_state_dict, apply_adapters, build_config, count_trainable,
                     merge_adapters, named_trainable_parameters, layer_ranks, trainable_parameters,
                     unmerge_adapters, wrap_linear)
from .registry import get_method, list_methods, register_method

# --- method registry: one line per method -------------------------------------------------
from . import lora  # noqa: E402,F401  "lora" (CLIP-LoRA preset)
from . import nora  # noqa: E402,F401  "nora"
from . import aira  # noqa: E402,F401  "aira"
from . import loraplus  # noqa: E402,F401  "loraplus" (LoRA+, B at λ·lr)
from . import lorafa  # noqa: E402,F401  "lorafa" (LoRA-FA, A frozen)
from . import vera  # noqa: E402,F401  "vera"
from . import adalora  # noqa: E402,F401  "adalora"
from . import dylora  # noqa: E402,F401  "dylora"
from . import dora  # noqa: E402,F401  "dora"
from . import pissa  # noqa: E402,F401  "pissa"

__all__ = [
    "AdapterConfig", "AdapterLinear", "LayerStats", "SplitAttention", "TrainingHooks", "param_groups", "training_hooks", "adapter_modules", "adapter_state_dict",
    "apply_adapters", "build_config", "collect_activation_stats", "count_trainable", "get_method",
    "is_adapter_tensor", "list_methods", "load_adapters", "merge_adapters", "named_trainable_parameters",
    "layer_ranks", "read_adapter_config", "register_method", "save_adapters", "split_attention",
    "trainable_parameters", "unmerge_adapters", "wrap_linear",
]
