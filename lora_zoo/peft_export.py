"""Export a model's adapters as a peft adapter: for transformers' ``CLIPModel``, or for the model itself.

``export_peft(model, directory)`` writes ``adapter_model.safetensors`` and then
``adapter_config.json`` (peft 0.21's keys), so that with stock peft and transformers

    base = CLIPModel.from_pretrained(...)          # the pretrained model: hf_clip.to_hf_clip(model)
    adapted = PeftModel.from_pretrained(base, directory)

computes what the adapted open_clip model computes. Target modules carry
transformers' names (``vision_model.encoder.layers.N.self_attn.q_proj``, ``k_proj``,
``v_proj``, ``out_proj``; ``text_model...``; ``mlp.fc1`` / ``mlp.fc2``). Adapters on any
other model (a transformers ``LlamaForCausalLM``, ``apply_adapters(model, m, targets=[...])``)
keep their own qualified module names, and the base of ``PeftModel.from_pretrained`` is that
model without adapters (``AutoModelForCausalLM.from_pretrained`` of the same weights); a causal LM's
config says ``task_type: CAUSAL_LM``, so peft gives a ``PeftModelForCausalLM`` (``generate`` works).

Each adapted layer exports the exact low-rank factors of its update relative to
the *pretrained* weight, ``W_eff − W = up @ down``, from the method's ``factors``
(scale, AIRA's ``diag(m)``, VeRA's vectors, AdaLoRA's ``λ`` all folded into ``up``):

- methods that keep W (LoRA, LoRA+, LoRA-FA, DyLoRA at its evaluation rank, VeRA,
  AdaLoRA, DoRA, the authors' NoRA): ``ΔW(θ)``, rank r;
- methods that start from a residual ``W − ΔW(θ₀)`` (PiSSA, the paper's NoRA,
  AIRA's owSVD init): ``ΔW(θ) − ΔW(θ₀) = [up, −up₀] @ [down; down₀]``, rank ≤ 2r.

Components whose factor is exactly zero (AdaLoRA's pruned triplets) are left out.
Every layer gets peft scaling exactly 1 (``lora_alpha`` = r, per-layer ranks in
``rank_pattern`` with the same values in ``alpha_pattern``, no rsLoRA). DoRA
exports as peft's DoRA (``use_dora``, ``lora_magnitude_vector`` = m; peft computes
``m ⊙ (W + up·down) / ‖W + up·down‖_row`` as lora_zoo does). A bias the adapter adds
(``extra_bias()``, the authors' NoRA double bias) goes into ``lora_B.bias``
(``lora_bias``). LoKr exports as peft's LoKr (``LoKrConfig``: the same r, α and factor
tensors, ``lokr_w1``, ``lokr_w2_a``, ...), which computes the same Kronecker product.
Dropout is not exported (``lora_dropout`` 0): the adapter describes
the trained model. A merged adapter exports the same as unmerged.

Refused, with one line and before anything is written: a model without adapters,
an architecture transformers' CLIP cannot represent (``hf_clip.convertible_config``),
an update that depends on the batch (AIRA ``act_scale="batch"``: no fixed weight
reproduces it), an update that is not the product of the method's factors,
DoRA layers mixed with others (peft's ``use_dora`` holds for the whole adapter), and
LoKr layers mixed with others (one peft adapter has one type).
peft is imported only by ``export_peft``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter import AdapterLinear, adapter_modules
from .dora import DoraLinear
from .files import atomic_write, write_text
from .hf_clip import INSTALL, convertible_config
from .kinds import refuse_without_weight_update
from .lokr import LokrLinear
from .targets import is_open_clip

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft puts before a module name in its state dict
_TOWERS = {"visual.transformer": "vision_model", "transformer": "text_model", "text.transformer": "text_model"}
_LAYERS = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
           "attn.o": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_NAME = re.compile(r"^(visual\.transformer|transformer|text\.transformer)\.resblocks\.(\d+)\.(.+)$")
#: how far the exported product may be from the adapter's own ΔW, relative to the largest |W|
PRODUCT_TOLERANCE = 1e-5


def hf_module_name(name: str) -> str:
    """transformers' CLIPModel name of the layer lora_zoo calls ``name`` (``visual.transformer.resblocks.3.attn.q``
    → ``vision_model.encoder.layers.3.self_attn.q_proj``)."""
    match = _NAME.match(name)
    if match is None or match.group(3) not in _LAYERS:
        raise ValueError(f"cannot export the adapter at {name}: transformers' CLIPModel has no such layer "
                         f"(expected {', '.join(_LAYERS)} of a transformer block)")
    tower, index, layer = match.groups()
    return f"{_TOWERS[tower]}.encoder.layers.{index}.{_LAYERS[layer]}"


@dataclass
class LayerExport:
    """One layer's update relative to its pretrained weight, in peft's terms (scaling 1)."""

    up: torch.Tensor                     # lora_B.weight, d_out × k
    down: torch.Tensor                   # lora_A.weight, k × d_in
    magnitude: Optional[torch.Tensor]    # lora_magnitude_vector (DoRA)
    bias: Optional[torch.Tensor]         # lora_B.bias (an extra bias)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _evaluation_factors(adapter: AdapterLinear, tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``adapter.factors`` as evaluation uses them (DyLoRA: its evaluation rank, not a sampled one)."""
    training = adapter.training
    adapter.eval()
    try:
        return adapter.factors(tensors)
    finally:
        adapter.train(training)


def _drop_zero_components(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave out components whose up column or down row is exactly zero (at least one stays): the same product."""
    keep = (up != 0).any(dim=0) & (down != 0).any(dim=1)
    if not bool(keep.any()):
        keep[0] = True
    return up[:, keep].contiguous(), down[keep].contiguous()


@torch.no_grad()
def layer_export(name: str, adapter: AdapterLinear) -> LayerExport:
    """The exact peft factors of one adapter's update relative to its pretrained weight (or a one-line refusal)."""
    method = adapter.method_name
    if not adapter.mergeable:
        raise ValueError(f"{method} cannot be exported as a peft adapter: {name}'s update depends on the batch "
                         "(act_scale='batch'), so no fixed weight reproduces it")
    tensors = {n: t.detach().float() for n, t in adapter.trainable_tensors().items()}
    up, down = (t.float() for t in _evaluation_factors(adapter, tensors))
    if adapter.has_residual:
        if isinstance(adapter, DoraLinear):
            raise ValueError(f"{method} at {name}: DoRA with a residual has no peft form")
        initial = {n: getattr(adapter, n + "_init").detach().float() for n in tensors}
        up0, down0 = (t.float() for t in _evaluation_factors(adapter, initial))
        up, down = torch.cat([up, -up0], dim=1), torch.cat([down, down0], dim=0)
    if not isinstance(adapter, DoraLinear):  # DoRA's update is not additive: peft's use_dora carries it
        expected = adapter.delta_weight().float()
        if adapter.has_residual:
            expected = expected - adapter.initial_delta_weight().float()
        error = (up @ down - expected).abs().max()
        if error > PRODUCT_TOLERANCE * adapter.original_weight().abs().max().clamp_min(1e-12):
            raise ValueError(f"{method} cannot be exported as a peft adapter: at {name} its merged update is not the "
                             f"product of its factors (max difference {float(error):.2e})")
    up, down = _drop_zero_components(up, down)
    magnitude = adapter.lora_magnitude.detach().float() if isinstance(adapter, DoraLinear) else None
    extra = adapter.extra_bias()
    return LayerExport(up, down, magnitude, None if extra is None else extra.detach().float())


@dataclass
class LokrExport:
    """One LoKr layer as peft's LoKr holds it: its tensors under peft's names and the config that builds them."""

    tensors: dict[str, torch.Tensor]   # lokr_w1 or lokr_w1_a/_b; lokr_w2 or lokr_w2_a/_b
    config: dict                       # r, alpha, decompose_both, decompose_factor


@torch.no_grad()
def lokr_export(adapter: LokrLinear) -> LokrExport:
    config = adapter.config
    tensors = {"lokr_" + n.removeprefix("lora_"): t.detach().float() for n, t in adapter.trainable_tensors().items()}
    return LokrExport(tensors, dict(r=config.rank, alpha=float(config.alpha), decompose_both=config.decompose_both,
                                    decompose_factor=config.decompose_factor))


def peft_exports(model: nn.Module) -> dict[str, LayerExport | LokrExport]:
    """``{peft module name: LayerExport or LokrExport}`` for every adapter of ``model`` (transformers' CLIPModel names
    for an open_clip model, else the model's own); refusals as ``export_peft``."""
    adapters = adapter_modules(model)
    if not adapters:
        raise ValueError("the model has no lora_zoo adapters to export (apply_adapters or load_adapters first)")
    name_of = hf_module_name if is_open_clip(model) else str
    if is_open_clip(model):
        convertible_config(model)
    lokr = {isinstance(adapter, LokrLinear) for adapter in adapters.values()}
    if len(lokr) > 1:
        raise ValueError("cannot export LoKr layers together with others: one peft adapter has one type")
    if lokr == {True}:
        return {name_of(name): lokr_export(adapter) for name, adapter in adapters.items()}
    exports = {name_of(name): layer_export(name, adapter) for name, adapter in adapters.items()}
    dora = {e.magnitude is not None for e in exports.values()}
    if len(dora) > 1:
        raise ValueError("cannot export DoRA layers together with others: peft's use_dora holds for the whole adapter")
    return exports


def peft_tensors(exports: dict[str, LayerExport | LokrExport]) -> dict[str, torch.Tensor]:
    """The adapter's state dict under the keys ``PeftModel.from_pretrained`` reads."""
    if all(isinstance(e, LokrExport) for e in exports.values()):
        return {f"{PREFIX}{module}.{name}": tensor.to("cpu", torch.float32).contiguous()
                for module, export in exports.items() for name, tensor in export.tensors.items()}
    with_bias = any(e.bias is not None for e in exports.values())
    state = {}
    for module, export in exports.items():
        key = PREFIX + module
        state[f"{key}.lora_A.weight"] = export.down
        state[f"{key}.lora_B.weight"] = export.up
        if with_bias:  # lora_bias is one switch: layers without an extra bias get zeros
            bias = export.bias if export.bias is not None else torch.zeros(export.up.shape[0])
            state[f"{key}.lora_B.bias"] = bias
        if export.magnitude is not None:
            state[f"{key}.lora_magnitude_vector"] = export.magnitude
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _lokr_config(exports: dict[str, LokrExport], base_model_name_or_path: Optional[str]):
    """peft's ``LoKrConfig`` of LoKr layers (all built from one config: the same r, α and factor rule)."""
    from peft import LoKrConfig

    (config,) = {tuple(sorted(e.config.items())) for e in exports.values()}
    return LoKrConfig(**dict(config), target_modules=sorted(exports), rank_dropout=0.0, module_dropout=0.0,
                      init_weights=True, inference_mode=True, base_model_name_or_path=base_model_name_or_path)


def _task_type(model: Optional[nn.Module]) -> Optional[str]:
    """peft's task type of a transformers model with a causal LM head (``PeftModelForCausalLM``), else None."""
    causal = model is not None and type(model).__name__.endswith("ForCausalLM") and hasattr(model, "generate")
    return "CAUSAL_LM" if causal else None


def peft_config(exports: dict[str, LayerExport | LokrExport], base_model_name_or_path: Optional[str] = None,
                model: Optional[nn.Module] = None) -> dict:
    """``adapter_config.json``'s content, validated by peft's own ``LoraConfig`` (scaling 1 in every layer) or
    ``LoKrConfig``; ``model``: the adapted model (CLIP unless it is another model)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError(f"export_peft needs peft ({INSTALL})") from None
    clip = model is None or is_open_clip(model)
    if all(isinstance(e, LokrExport) for e in exports.values()):
        return _config_values(_lokr_config(exports, base_model_name_or_path), clip, _task_type(model))
    ranks = {module: export.rank for module, export in exports.items()}
    # the most common rank is r; the others (AIRA's allocation, AdaLoRA's pruning) go to rank_pattern
    common = min(Counter(ranks.values()).most_common(), key=lambda item: (-item[1], item[0]))[0]
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != common}
    config = LoraConfig(
        r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
        target_modules=sorted(exports), lora_dropout=0.0, bias="none", inference_mode=True,
        use_dora=any(e.magnitude is not None for e in exports.values()),
        lora_bias=any(e.bias is not None for e in exports.values()),
        base_model_name_or_path=base_model_name_or_path)
    return _config_values(config, clip, _task_type(model))


def _config_values(config, clip: bool, task_type: Optional[str]) -> dict:
    values = config.to_dict()
    values = {k: sorted(v) if isinstance(v, set) else v for k, v in values.items()}
    if task_type is not None:
        values["task_type"] = task_type
    if clip:  # as peft writes it for a CLIPModel, so AutoPeftModel can find the base class
        values["auto_mapping"] = {"base_model_class": "CLIPModel",
                                  "parent_library": "transformers.models.clip.modeling_clip"}
    return values


def export_peft(model: nn.Module, directory, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``model``'s adapters as a peft adapter into ``directory``: for transformers' CLIPModel when ``model`` is
    an open_clip model, else for ``model`` itself (its module names).

    ``base_model_name_or_path`` is recorded in the config for ``AutoPeftModel`` (e.g.
    ``openai/clip-vit-base-patch16`` for a run on OpenAI's ViT-B-16, or the folder where
    ``to_hf_clip(model).save_pretrained`` put the converted pretrained model); loading with
    ``PeftModel.from_pretrained(base, directory)`` does not read it. Everything is checked before
    anything is written; the weights are written first and the config last, each atomically, so a
    readable config means a complete adapter. Returns ``directory``.
    """
    refuse_without_weight_update(model, "exported as a peft adapter")
    exports = peft_exports(model)
    if base_model_name_or_path is None and not is_open_clip(model):
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = peft_config(exports, base_model_name_or_path, model)
    tensors = peft_tensors(exports)
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
