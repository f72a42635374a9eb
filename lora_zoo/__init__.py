"""lora_zoo: LoRA, NoRA and AIRA (ICCV 2025) and the methods they are compared with, on open_clip CLIP models.

Public API::

    list_methods(), get_method(name)   registered methods (metadata: kind, display name, citation, protocol lr)
    apply_method(model, method, classes=None, support=None, stats=None, **options)   any kind of method
    wrap_linear(linear, method, stats=None, **cfg)
    apply_adapters(model, method, encoders=("vision", "text"), targets=("q", "k", "v"),
                   layers=None, stats=None, **options)          -> {layer name: adapter}   (weight adapters)
        on any other model targets are module-name patterns: apply_adapters(llama, "nora",
        targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], stats=collect_token_stats(...))
    ClassSet.of(names, prompts, tokenizer), scorer_of(model)  the classes a model scores, and how it scores them
    collect_activation_stats(model, image_batches=None, text_batches=None, targets=...)
    collect_token_stats(model, batches of (input_ids, attention_mask), targets=[patterns])
    build_optimizer(model, lr, ...), training_hooks(model, total_steps, seed)
    trainable_parameters(model), count_trainable(model)
    merge_adapters(model), unmerge_adapters(model)
    save_adapters(model, path), load_adapters(model, path)   any kind
    export_peft(model, directory), to_hf_clip(model)  a peft adapter for transformers' CLIPModel (peft needed)

A method is one file: its class registers itself (``@register_method`` beside it, ``register_preset``
for a method + optimizer pair) and its module is imported by ``catalog.py``, the one list of method
modules. Its kind (``kinds.py``: weights, prompts, tensors, head) says how it is applied, trained,
saved, merged and exported.

Imports are lazy: ``import lora_zoo`` (or any of its modules, e.g. ``lora_zoo.files``
from ``datasets``) loads no torch; each name above is imported from its module on
first use, and ``lora_zoo.<module>`` works for every module of the package. The
package's layers (entry points > pipeline > loop > methods > method bases >
primitives) are import contracts in ``pyproject.toml`` (``[tool.importlinter]``),
checked by the test suite.
"""
import importlib
from typing import TYPE_CHECKING

from .host import __version__

#: public name -> the module of the package that defines it
_EXPORTS = {
    "AdapterConfig": "adapter", "AdapterLinear": "adapter", "adapter_modules": "adapter",
    "SplitAttention": "attention", "split_attention": "attention",
    "LayerStats": "calibration", "collect_activation_stats": "calibration", "collect_token_stats": "calibration",
    "get_method": "catalog", "get_optimizer": "catalog", "list_methods": "catalog", "list_optimizers": "catalog",
    "load_adapters": "checkpoint", "read_adapter_config": "checkpoint", "save_adapters": "checkpoint",
    "TrainingHooks": "hooks", "training_hooks": "hooks",
    "apply_adapters": "inject", "build_config": "inject", "layer_ranks": "inject", "merge_adapters": "inject",
    "unmerge_adapters": "inject", "wrap_linear": "inject",
    "apply_method": "kinds", "kind_of": "kinds", "scorer_of": "kinds",
    "FeatureHead": "learner", "Learner": "learner", "LearnerConfig": "learner", "PromptLearner": "learner",
    "TensorLearner": "learner",
    "adapter_state_dict": "naming", "count_trainable": "naming", "is_adapter_tensor": "naming",
    "named_trainable_parameters": "naming", "trainable_parameters": "naming",
    "build_optimizer": "optim", "param_groups": "optim",
    "MethodSpec": "registry", "register_method": "registry", "register_optimizer": "registry",
    "register_preset": "registry",
    "ClassSet": "scoring", "Scorer": "scoring",
    "export_peft": "peft_export", "to_hf_clip": "hf_clip",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names for type checkers and IDEs, at no import cost
    from .adapter import AdapterConfig, AdapterLinear, adapter_modules  # noqa: F401
    from .attention import SplitAttention, split_attention  # noqa: F401
    from .calibration import LayerStats, collect_activation_stats, collect_token_stats  # noqa: F401
    from .catalog import get_method, get_optimizer, list_methods, list_optimizers  # noqa: F401
    from .checkpoint import load_adapters, read_adapter_config, save_adapters  # noqa: F401
    from .hf_clip import to_hf_clip  # noqa: F401
    from .hooks import TrainingHooks, training_hooks  # noqa: F401
    from .inject import (apply_adapters, build_config, layer_ranks, merge_adapters, unmerge_adapters,  # noqa: F401
                         wrap_linear)
    from .kinds import apply_method, kind_of, scorer_of  # noqa: F401
    from .learner import FeatureHead, Learner, LearnerConfig, PromptLearner, TensorLearner  # noqa: F401
    from .naming import (adapter_state_dict, count_trainable, is_adapter_tensor,  # noqa: F401
                         named_trainable_parameters, trainable_parameters)
    from .optim import build_optimizer, param_groups  # noqa: F401
    from .peft_export import export_peft  # noqa: F401
    from .registry import MethodSpec, register_method, register_optimizer, register_preset  # noqa: F401
    from .scoring import ClassSet, Scorer  # noqa: F401


def __getattr__(name: str):
    """``lora_zoo.<name>``: a public name imported from its module, or a module of the package."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
