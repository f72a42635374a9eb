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
    export_peft(model, directory), to_hf_clip(model)  a peft adapter for transformers' CLIPModel (peft needed)

Methods register themselves (``@register_method`` beside each adapter class,
``register_preset`` for a layer + optimizer pair); the modules that register
something are imported when the registry is first asked, so a method is one file.

Imports are lazy: ``import lora_zoo`` (or any of its modules, e.g. ``lora_zoo.files``
from ``datasets``) loads no torch; each name above is imported from its module on
first use, and ``lora_zoo.<module>`` works for every module of the package. The
package's layers (entry points > pipeline > loop > methods > adapter base >
primitives) are import contracts in ``pyproject.toml`` (``[tool.importlinter]``),
checked by the test suite.
"""
import importlib

from .host import __version__

#: public name -> the module of the package that defines it
_EXPORTS = {
    "AdapterConfig": "adapter", "AdapterLinear": "adapter", "adapter_modules": "adapter",
    "SplitAttention": "attention", "split_attention": "attention",
    "LayerStats": "calibration", "collect_activation_stats": "calibration",
    "load_adapters": "checkpoint", "read_adapter_config": "checkpoint", "save_adapters": "checkpoint",
    "TrainingHooks": "hooks", "training_hooks": "hooks",
    "apply_adapters": "inject", "build_config": "inject", "layer_ranks": "inject", "merge_adapters": "inject",
    "unmerge_adapters": "inject", "wrap_linear": "inject",
    "adapter_state_dict": "naming", "count_trainable": "naming", "is_adapter_tensor": "naming",
    "named_trainable_parameters": "naming", "trainable_parameters": "naming",
    "build_optimizer": "optim", "get_optimizer": "optim", "list_optimizers": "optim", "param_groups": "optim",
    "register_optimizer": "optim",
    "MethodSpec": "registry", "get_method": "registry", "list_methods": "registry", "register_method": "registry",
    "register_preset": "registry",
    "export_peft": "peft_export", "to_hf_clip": "hf_clip",
}
__all__ = sorted(_EXPORTS)


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
