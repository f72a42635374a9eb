"""Kinds of methods: what the stages, the loop and the checkpoints call, so that none of them branches on a
method's name or kind.

| kind      | the method's class                 | what it changes                       | trains on        | merges |
|-----------|------------------------------------|---------------------------------------|------------------|--------|
| weights   | ``AdapterLinear`` (adapter.py)     | the weights of target linear layers   | images           | yes    |
| prompts   | ``PromptLearner`` (learner.py)     | tokens fed to a tower                 | images           | no     |
| tensors   | ``TensorLearner`` (learner.py)     | other backbone tensors (LayerNorms)   | images           | no     |
| head      | ``FeatureHead`` (learner.py)       | a function of frozen image features   | cached features  | no     |

A ``Kind`` says how a method of its kind is checked against a model and its task before any work
(``check_fits``, ``check_task``), whether it needs calibration statistics, how it is put on the model
(``install``), how the adapted model classifies (``scorer``), what ``adapters.json`` records
to rebuild it (``record``), how it is rebuilt and loaded from a checkpoint (``rebuild``,
``check_matches``, ``load_tensors``), and whether it merges into the weights (``merge``; a kind
without a weight update says what to use instead of a merged or peft export, ``instead``).
``apply_method`` is the library's one call for every kind.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from .adapter import adapter_modules, apply_delta
from .attached import MethodSetup, method_setup
from .catalog import get_method
from .inject import apply_adapters, check_fits, merge_adapters, method_options
from .learner import Learner, Support, Task, attached_learner
from .naming import is_adapter_tensor
from .scoring import ClassSet, Scorer

LEARNER_ATTRIBUTE = "lora_zoo_learner"


class Kind:
    """What every kind provides (the weights kind's answers are the defaults of none: each kind says all)."""

    name = "?"
    merges = False            # has a weight update that merging and the exports fold into the weights
    caches_features = False   # trains on features of augmented views computed once (``features.py``)

    def check_task(self, model, method: str, options: Mapping[str, Any], task: Task) -> None:
        """A one-line error before any work when the method cannot train this task (``Learner.check_task``)."""

    def check_classes(self, model, method: str, options: Mapping[str, Any], classes: ClassSet,
                      training: ClassSet) -> None:
        """A one-line error when the method trained on ``training`` cannot score ``classes`` (a learner's prompts too
        long for the text context, a per-class context of other classes), before any work; weight adapters score any
        classes."""

    def instead(self, method: str) -> str:
        """What to use instead of a merged or peft export, for a kind without a weight update."""
        return (f"{method} is a {self.name} method: it has no weight update to merge or export; evaluate the run "
                "with --eval_only, or load its adapters.safetensors with lora_zoo.load_adapters")


class WeightsKind(Kind):
    """Weight adapters (``AdapterLinear``) in place of target linear layers of the towers."""

    name = "weights"
    merges = True

    def check_fits(self, model, method: str, options: Mapping[str, Any], encoders, targets, layers) -> None:
        check_fits(model, method, encoders=encoders, targets=targets, layers=layers, **options)

    def install(self, model, method: str, options: Mapping[str, Any], *, classes=None, stats=None, support=None,
                encoders=("vision", "text"), targets=("q", "k", "v"), layers=None) -> None:
        apply_adapters(model, method, encoders=encoders, targets=targets, layers=layers, stats=stats, **options)

    def scorer(self, model) -> Scorer:
        return Scorer(fixed_classes="text" not in method_setup(model).encoders)

    def record(self, model) -> dict[str, Any]:
        setup = method_setup(model)
        return {"layer": setup.layer, "config": setup.config, "encoders": list(setup.encoders),
                "targets": list(setup.targets), "layers": list(setup.layers) if setup.layers is not None else None,
                "layer_overrides": setup.layer_overrides}

    def rebuild(self, model, meta: Mapping[str, Any], stats) -> None:
        apply_adapters(model, meta["layer"], encoders=meta["encoders"], targets=meta["targets"], layers=meta["layers"],
                       stats=stats or None, layer_overrides=meta["layer_overrides"], **meta["config"])

    def check_matches(self, model, meta: Mapping[str, Any], stats, path) -> None:
        setup = method_setup(model)
        saved = {"method": meta["layer"], "encoders": tuple(meta["encoders"]), "targets": tuple(meta["targets"]),
                 "layers": tuple(meta["layers"]) if meta["layers"] is not None else None}
        have = {"method": setup.layer, "encoders": setup.encoders, "targets": setup.targets, "layers": setup.layers}
        for key in saved:
            if saved[key] != have[key]:
                raise ValueError(f"checkpoint {path} was saved with {key}={saved[key]}, but the model has "
                                 f"{key}={have[key]}")
        _check_config(meta, setup, path)
        for name in sorted(set(meta["layer_overrides"]) | set(setup.layer_overrides)):
            a, b = meta["layer_overrides"].get(name), setup.layer_overrides.get(name)
            if a != b:
                raise ValueError(f"checkpoint {path} has per-layer options {a} for {name}, the model has {b}")
        for name, adapter in adapter_modules(model).items():
            if name in stats and (adapter.stats is None or not all(
                    torch.allclose(adapter.stats.tensors()[f].cpu(), t) for f, t in stats[name].tensors().items())):
                raise ValueError(f"the model's {name} was built from other calibration statistics than checkpoint "
                                 f"{path}; load into a model without adapters to rebuild them from the checkpoint")

    @torch.no_grad()
    def load_tensors(self, model, tensors: Mapping[str, torch.Tensor]) -> None:
        """Each adapter back to the weight it was built on, its tensors swapped, then as it was (``apply_delta``)."""
        for prefix, adapter in adapter_modules(model).items():
            was_merged = adapter.merged
            adapter.unmerge()
            if adapter.has_residual:
                apply_delta(adapter.base_layer.weight, None, adapter.initial_delta_weight())
            for name in adapter.state_dict():
                if is_adapter_tensor(name):
                    getattr(adapter, name).copy_(tensors[f"{prefix}.{name}"])
            if adapter.has_residual:
                apply_delta(adapter.base_layer.weight, None, adapter.initial_delta_weight(), sign=-1)
            if was_merged:
                adapter.merge()

    def merge(self, model) -> bool:
        """Merge the adapters where they can be (the evaluated model is then the exported one)."""
        mergeable = all(a.mergeable for a in adapter_modules(model).values())
        if mergeable:
            merge_adapters(model)
        return mergeable


class LearnerKind(Kind):
    """Methods that are a learned module (``Learner``) attached to the model as ``model.lora_zoo_learner``."""

    def __init__(self, name: str, caches_features: bool = False):
        self.name, self.caches_features = name, caches_features

    def check_fits(self, model, method: str, options: Mapping[str, Any], encoders, targets, layers) -> None:
        spec, config, _ = method_options(method, options)
        spec.layer_class.check_fits(model, config)

    def check_task(self, model, method: str, options: Mapping[str, Any], task: Task) -> None:
        spec, config, _ = method_options(method, options)
        spec.layer_class.check_task(model, config, task)

    def check_classes(self, model, method: str, options: Mapping[str, Any], classes: ClassSet,
                      training: ClassSet) -> None:
        spec, config, _ = method_options(method, options)
        spec.layer_class.check_classes(model, config, classes, training)

    def install(self, model, method: str, options: Mapping[str, Any], *, classes: Optional[ClassSet] = None,
                stats=None, support: Optional[Support] = None, **_) -> None:
        if classes is None:
            raise ValueError(f"{method} is a {self.name} method: apply_method needs the training classes (classes=)")
        spec, config, hooks_options = method_options(method, options)
        _attach(model, spec, config, lambda: spec.layer_class(model, config, classes, support),
                {} if hooks_options is None else hooks_options.to_dict())

    def scorer(self, model) -> Scorer:
        return attached_learner(model)

    def record(self, model) -> dict[str, Any]:
        setup = method_setup(model)
        return {"layer": setup.layer, "config": setup.config, "record": attached_learner(model).record()}

    def rebuild(self, model, meta: Mapping[str, Any], stats) -> None:
        spec = get_method(meta["layer"])
        config = spec.config_class.from_dict(meta["config"])
        _attach(model, spec, config, lambda: spec.layer_class.rebuild(model, config, meta["record"]), {})

    def check_matches(self, model, meta: Mapping[str, Any], stats, path) -> None:
        setup = method_setup(model)
        if meta["layer"] != setup.layer:
            raise ValueError(f"checkpoint {path} was saved with method={meta['layer']}, but the model has "
                             f"method={setup.layer}")
        _check_config(meta, setup, path)

    @torch.no_grad()
    def load_tensors(self, model, tensors: Mapping[str, torch.Tensor]) -> None:
        named = model.state_dict(keep_vars=True)
        for name, tensor in tensors.items():
            named[name].copy_(tensor)

    def merge(self, model) -> bool:
        return False


def _check_config(meta: Mapping[str, Any], setup: MethodSetup, path) -> None:
    for key in sorted(set(meta["config"]) | set(setup.config)):
        if meta["config"].get(key) != setup.config.get(key):
            raise ValueError(f"checkpoint {path} was saved with {key}={meta['config'].get(key)!r}, "
                             f"but the model's adapters have {key}={setup.config.get(key)!r}")


def _attach(model: nn.Module, spec, config, build, hooks_options: dict) -> None:
    """Freeze the model, build the learner (it may wrap modules of the model) and attach it, trainable."""
    if getattr(model, "lora_zoo_setup", None) is not None or adapter_modules(model):
        raise ValueError("model already has a method applied; apply_method expects a model without one")
    for param in model.parameters():
        param.requires_grad_(False)
    learner: Learner = build()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    setattr(model, LEARNER_ATTRIBUTE, learner.to(device).train(model.training))
    model.lora_zoo_setup = MethodSetup(spec.name, spec.layer, config.to_dict(), kind=spec.kind,
                                       schedule_options=hooks_options, record=learner.record(), spec=spec)


KINDS: dict[str, Kind] = {"weights": WeightsKind(), "prompts": LearnerKind("prompts"),
                          "tensors": LearnerKind("tensors"), "head": LearnerKind("head", caches_features=True)}


def kind_of(method_or_model) -> Kind:
    """The kind of a method (its name) or of the method applied to a model."""
    if isinstance(method_or_model, nn.Module):
        return KINDS[method_setup(method_or_model).kind]
    return KINDS[get_method(method_or_model).kind]


def apply_method(model: nn.Module, method: str, *, classes: Optional[ClassSet] = None, support: Optional[Support] = None,
                 stats=None, encoders: Iterable[str] = ("vision", "text"), targets: Iterable[str] = ("q", "k", "v"),
                 layers: Optional[Iterable[int]] = None, **options) -> None:
    """Apply ``method`` (of any kind) to an open_clip CLIP model in place, with its ``options``.

    Weight adapters take ``encoders``/``targets``/``layers`` and ``stats`` (as ``apply_adapters``); a learner
    takes the training ``classes`` (``ClassSet``) and, for a head, the ``support`` features."""
    kind_of(method).install(model, method, options, classes=classes, stats=stats, support=support,
                            encoders=encoders, targets=targets, layers=layers)


def apply_method_on_batch(model: nn.Module, method: str, classes: ClassSet, images: torch.Tensor,
                          labels: torch.Tensor, stats=None, **kwargs) -> torch.Tensor:
    """``apply_method`` for code that trains on one batch (benchmarks, tests): a head's support is the batch's frozen
    features (one view); returns what the method's training step takes: the images, or their normalised features."""
    support = None
    if kind_of(method).caches_features:
        with torch.no_grad():
            support = Support(model.encode_image(images).float()[None], labels)
    apply_method(model, method, classes=classes, support=support, stats=stats, **kwargs)
    if support is None:
        return images
    return torch.nn.functional.normalize(support.features[0], dim=-1)


def refuse_without_weight_update(model: nn.Module, what: str) -> None:
    """A one-line error when the method applied to ``model`` has no weight update to be ``what`` (exported...)."""
    setup = getattr(model, "lora_zoo_setup", None)
    if setup is not None and not KINDS[setup.kind].merges:
        raise ValueError(f"{setup.method} cannot be {what}: {KINDS[setup.kind].instead(setup.method)}")


def scorer_of(model: nn.Module) -> Scorer:
    """How ``model`` classifies: what the loop and the evaluation call (CLIP's zero-shot classifier for a model
    with no method applied)."""
    if getattr(model, "lora_zoo_setup", None) is None:
        return Scorer(fixed_classes=True)
    return kind_of(model).scorer(model)
