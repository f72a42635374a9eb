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

from .adapter import adapter_modules
from .attached import method_setup
from .calibration import LayerStats
from .catalog import get_method
from .files import atomic_write, sha256_file, sha256_json, write_json
from .host import versions
from .kinds import KINDS
from .naming import adapter_state_dict

FORMAT_VERSION = 2
STATS_PREFIX = "stats::"
RECORD_DIGEST = "record_sha256"  # adapters.json's key for the sha256 of its other keys (the tensors' sha256 among them)


def config_path(path) -> Path:
    return Path(path).with_suffix(".json")


def save_adapters(model: nn.Module, path) -> Path:
    """Write the method's tensors to ``path`` (.safetensors) and what rebuilds it to ``path`` with suffix .json."""
    setup = method_setup(model)
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter_state_dict(model).items()}
    tokens = {}
    for name, adapter in adapter_modules(model).items():
        if adapter.stats is not None:
            tokens[name] = adapter.stats.tokens
            for field, value in adapter.stats.tensors().items():
                tensors[f"{STATS_PREFIX}{name}::{field}"] = value.detach().float().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "kind": setup.kind, "method": setup.method,
            **KINDS[setup.kind].record(model), "stats_tokens": tokens, "versions": versions()}
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
    meta.setdefault("kind", "weights")  # files written before there were other kinds
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


@torch.no_grad()
def load_adapters(model: nn.Module, path) -> dict:
    """Load a method saved by ``save_adapters`` into ``model`` (applying it first if the model has none)."""
    meta = read_adapter_config(path)
    tensors = read_adapter_tensors(path, meta)
    stats = _saved_stats(tensors, meta)
    kind = KINDS[meta["kind"]]
    if getattr(model, "lora_zoo_setup", None) is None and not adapter_modules(model):
        kind.rebuild(model, meta, stats)
    if method_setup(model).kind != meta["kind"]:
        raise ValueError(f"checkpoint {path} holds a {meta['kind']} method ({meta['layer']}), but the model has a "
                         f"{method_setup(model).kind} method ({method_setup(model).layer})")
    kind.check_matches(model, meta, stats, path)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
        raise ValueError(f"checkpoint {path} {what} ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    kind.load_tensors(model, tensors)
    return meta
