"""Saving and loading adapters: a safetensors file of adapter tensors plus a JSON config beside it.

``save_adapters(model, "run/adapters.safetensors")`` writes the ``lora_`` tensors
(trainable ones, the θ₀ snapshots residual methods need, fixed buffers such as
AIRA's output scale), the calibration statistics the layers were built with,
and ``run/adapters.json`` (the layer method and its config, encoders, targets,
layers, the per-layer options such as AIRA's rank allocation, the method it was
trained as, package versions, the sha256 of the ``.safetensors`` file's bytes, and ``record_sha256``: the
sha256 of every other key of the JSON as canonical JSON, so that one digest covers both files).
Only what rebuilds the layers is recorded: the optimizer builder (LoRA+,
LoRA-FA) and a training schedule's options (AdaLoRA's budget) are not, so a
checkpoint loads whatever trained it. Both files are written atomically. Frozen factors derived from W (NoRA's outer
SVD, VeRA's seeded matrices) are not stored: they are rebuilt from the base
model, deterministically.

``load_adapters(model, path)`` into a model without adapters first injects
them as saved; into an adapted model it checks that layer method, layer
options, targets and per-layer ranks agree and names the first mismatch otherwise.
A tensor file whose bytes no longer match the recorded sha256 (flipped, truncated,
replaced), a JSON whose content no longer matches its ``record_sha256`` (an edited
``alpha`` would change every score), or a tensor file that safetensors cannot parse, is a
one-line error naming it; files saved before a checksum was recorded load unchecked.
Format-1 files (lora_zoo 0.1) are read, except VeRA and AIRA ``act_scale="batch"``
ones: those layers compute something else from the same tensors now, so they are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import adapter_modules, adapter_setup, apply_delta
from .calibration import LayerStats
from .files import atomic_write, sha256_file, sha256_json, write_json
from .inject import AdapterSetup, apply_adapters
from .naming import adapter_state_dict, is_adapter_tensor
from .host import versions
from .registry import get_method

FORMAT_VERSION = 2
STATS_PREFIX = "stats::"
RECORD_DIGEST = "record_sha256"  # adapters.json's key for the sha256 of its other keys (the tensors' sha256 among them)


def config_path(path) -> Path:
    return Path(path).with_suffix(".json")


def _setup(model: nn.Module) -> AdapterSetup:
    return adapter_setup(model)


def save_adapters(model: nn.Module, path) -> Path:
    """Write adapter tensors to ``path`` (.safetensors) and the setup to ``path`` with suffix .json."""
    setup = _setup(model)
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter_state_dict(model).items()}
    tokens = {}
    for name, adapter in adapter_modules(model).items():
        if adapter.stats is not None:
            tokens[name] = adapter.stats.tokens
            for field, value in adapter.stats.tensors().items():
                tensors[f"{STATS_PREFIX}{name}::{field}"] = value.detach().float().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "layer": setup.layer, "method": setup.method, "config": setup.config,
            "encoders": list(setup.encoders), "targets": list(setup.targets),
            "layers": list(setup.layers) if setup.layers is not None else None,
            "layer_overrides": setup.layer_overrides, "stats_tokens": tokens, "versions": versions()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "lora_zoo"}))
    meta["sha256"] = sha256_file(path)  # of the bytes as written: read_adapter_tensors checks it
    meta[RECORD_DIGEST] = sha256_json(meta, RECORD_DIGEST)  # of what rebuilds the layers: read_adapter_config checks it
    write_json(config_path(path), meta)
    return path


def _refuse_changed_since_v1(cfg_path: Path, layer: str, config: dict) -> None:
    """One-line error for a format-1 checkpoint whose layers now compute something else from the same tensors."""
    changed = {"vera": "VeRA's frozen pair is now drawn with bound sqrt(6/fan_in) (peft's), not 1/sqrt(fan_in)",
               "aira": "AIRA's act_scale='batch' now averages |y| over each sample's tokens (the authors' "
                       "formula), not over all tokens of the batch"}
    if layer == "vera" or (layer == "aira" and config.get("act_scale") == "batch"):
        raise ValueError(f"{cfg_path} is a format_version 1 {layer} checkpoint and cannot be loaded: {changed[layer]} "
                         "since it was written, so it would compute a different model; retrain it")


def _check_record(cfg_path: Path, meta: dict) -> None:
    """One-line error for an adapters.json whose content is not what was saved (checked before any upgrade of an
    older format fills in defaults); a file saved before the digest existed has none and is read as it is."""
    if RECORD_DIGEST in meta and sha256_json(meta, RECORD_DIGEST) != meta[RECORD_DIGEST]:
        raise ValueError(f"adapter config {cfg_path} does not match the {RECORD_DIGEST} recorded in it (edited or "
                         "damaged since it was saved; it rebuilds the layers, so every score would change); restore "
                         "it or train the run again")


def read_adapter_config(path) -> dict[str, Any]:
    """The JSON config saved beside an adapter file (one-line error if it is missing or unreadable)."""
    cfg_path = config_path(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"adapter file not found: {path} (expected a .safetensors written by save_adapters)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read adapter config {cfg_path}: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"adapter config {cfg_path} is not a JSON object (expected what save_adapters writes)")
    _check_record(cfg_path, meta)
    if meta.get("format_version") == 1:  # lora_zoo 0.1: one config per method, optimizer options included
        layer = get_method(meta["method"]).layer
        known = {f for f in get_method(layer).config_class.__dataclass_fields__}
        meta.update(format_version=FORMAT_VERSION, layer=layer,
                    config={k: v for k, v in meta["config"].items() if k in known})
        _refuse_changed_since_v1(cfg_path, layer, meta["config"])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    # options added since it was written take the defaults its options resolve to (what built it)
    meta["config"] = get_method(meta["layer"]).config_class.from_dict(meta["config"]).to_dict()
    return meta


def read_adapter_tensors(path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file ``path``, after checking its bytes against the sha256 ``meta`` (its
    ``adapters.json``) recorded; a damaged, truncated or empty file is a one-line error naming it."""
    recorded = meta.get("sha256")
    if recorded is not None and sha256_file(path) != recorded:
        raise ValueError(f"adapter file {path} does not match the sha256 recorded in {config_path(path).name} "
                         "(damaged, truncated or replaced since it was saved); restore it or train the run again")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every malformed file
        raise ValueError(f"cannot read adapter file {path} ({type(err).__name__}: {' '.join(str(err).split())}); "
                         "restore it or train the run again") from None


def _saved_stats(tensors, meta) -> dict[str, LayerStats]:
    stats = {}
    for name, tokens in meta["stats_tokens"].items():
        fields = {f: tensors.pop(f"{STATS_PREFIX}{name}::{f}") for f in LayerStats.FIELDS
                  if f"{STATS_PREFIX}{name}::{f}" in tensors}
        stats[name] = LayerStats(tokens=tokens, **fields)
    return stats


def _check_matches(model: nn.Module, meta, stats, path) -> None:
    setup = _setup(model)
    saved = {"method": meta["layer"], "encoders": tuple(meta["encoders"]), "targets": tuple(meta["targets"]),
             "layers": tuple(meta["layers"]) if meta["layers"] is not None else None}
    have = {"method": setup.layer, "encoders": setup.encoders, "targets": setup.targets, "layers": setup.layers}
    for key in saved:
        if saved[key] != have[key]:
            raise ValueError(f"checkpoint {path} was saved with {key}={saved[key]}, but the model has {key}={have[key]}")
    for key in sorted(set(meta["config"]) | set(setup.config)):
        if meta["config"].get(key) != setup.config.get(key):
            raise ValueError(f"checkpoint {path} was saved with {key}={meta['config'].get(key)!r}, "
                             f"but the model's adapters have {key}={setup.config.get(key)!r}")
    for name in sorted(set(meta["layer_overrides"]) | set(setup.layer_overrides)):
        a, b = meta["layer_overrides"].get(name), setup.layer_overrides.get(name)
        if a != b:
            raise ValueError(f"checkpoint {path} has per-layer options {a} for {name}, the model has {b}")
    for name, adapter in adapter_modules(model).items():
        if name in stats and (adapter.stats is None or not all(
                torch.allclose(adapter.stats.tensors()[f].cpu(), t) for f, t in stats[name].tensors().items())):
            raise ValueError(f"the model's {name} was built from other calibration statistics than checkpoint {path}; "
                             "load into a model without adapters to rebuild them from the checkpoint")


@torch.no_grad()
def load_adapters(model: nn.Module, path) -> dict:
    """Load adapters saved by ``save_adapters`` into ``model`` (injecting them first if it has none)."""
    meta = read_adapter_config(path)
    tensors = read_adapter_tensors(path, meta)
    stats = _saved_stats(tensors, meta)
    if not adapter_modules(model):
        apply_adapters(model, meta["layer"], encoders=meta["encoders"], targets=meta["targets"],
                       layers=meta["layers"], stats=stats or None, layer_overrides=meta["layer_overrides"],
                       **meta["config"])
    _check_matches(model, meta, stats, path)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
        raise ValueError(f"checkpoint {path} {what} ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    for prefix, adapter in adapter_modules(model).items():
        # back to the weight the adapter was built on, the tensors swapped, then as it was (apply_delta each time)
        was_merged = adapter.merged
        adapter.unmerge()
        if adapter.has_residual:
            apply_delta(adapter.base_layer.weight, None, adapter.initial_delta_weight())
        for name, tensor in adapter.state_dict().items():
            if is_adapter_tensor(name):
                getattr(adapter, name).copy_(tensors[f"{prefix}.{name}"])
        if adapter.has_residual:
            apply_delta(adapter.base_layer.weight, None, adapter.initial_delta_weight(), sign=-1)
        if was_merged:
            adapter.merge()
    return meta
