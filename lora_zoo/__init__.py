"""lora_zoo: LoRA, NoRA and AIRA (ICCV 2025) and their baselines as adapters on open_clip CLIP models.

Public API::

    list_methods(), get_method(name)   registered methods (metadata: display name, citation, protocol lr)
    wrap_linear(linear, method, stats=None, **cfg)
    apply_adapters(model, method, encoders=("vision", "text"), targets=("q", "k", "v"),
                   layers=None, stats=None, **options)          -> {layer name: adapter}
    collect_activation_stats(model, image_batches=None, text_batches=None, targets=...)
    build_optimizer(model, lr, ...), training_hooks(model, total_steps, seed)
    trainable_parameters(model), count_trainable(model)
    merge_adapters(model), unmerge_adapters(model)
    save_adapters(model, path), load_adapters(model, path)

Methods register themselves (``@register_method`` beside each adapter class,
``register_preset`` for a layer + optimizer pair); every module of the package
is imported when the registry is first asked, so a method is one file.
"""
__version__ = "0.2.0"

from .adapter import AdapterConfig, AdapterLinear, adapter_modules
from .attention import SplitAttention, split_attention
from .calibration import LayerStats, collect_activation_stats
from .checkpoint import load_adapters, read_adapter_config, save_adapters
from .hooks import TrainingHooks, training_hooks
from .inject import apply_adapters, build_config, layer_ranks, merge_adapters, unmerge_adapters, wrap_linear
from .naming import (adapter_state_dict, count_trainable, is_adapter_tensor, named_trainable_parameters,
                     trainable_parameters)
from .optim import build_optimizer, get_optimizer, list_optimizers, param_groups, register_optimizer
from .registry import MethodSpec, get_method, list_methods, register_method, register_preset

__all__ = [
    "AdapterConfig", "AdapterLinear", "LayerStats", "MethodSpec", "SplitAttention", "TrainingHooks",
    "adapter_modules", "adapter_state_dict", "apply_adapters", "build_config", "build_optimizer",
    "collect_activation_stats", "count_trainable", "get_method", "get_optimizer", "is_adapter_tensor",
    "layer_ranks", "list_methods", "list_optimizers", "load_adapters", "merge_adapters",
    "named_trainable_parameters", "param_groups", "read_adapter_config", "register_method", "register_optimizer",
    "register_preset", "save_adapters", "split_attention", "trainable_parameters", "training_hooks",
    "unmerge_adapters", "wrap_linear",
]
