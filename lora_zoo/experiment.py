"""One few-shot CLIP adaptation experiment, from an ``ExperimentConfig`` to ``result.json``.

Implements the protocol of METHODS.md ("Experiment protocol"; CLIP-LoRA, Zanella &
Ben Ayed, CVPRW 2024; NoRA and AIRA, Li et al., ICCV 2025): open_clip backbone →
few-shot split (``datasets``) → zero-shot accuracy with the same prompts →
calibration statistics when the method needs them (vision: the few-shot train
images with the test transform; text: the class prompts; only adapted encoders) →
``apply_adapters`` → the one training loop (``train.py``) → merge → top-1 on the
full test split → outputs, atomically, under
``output_dir/<backbone>/<dataset>/<shots>shots/seed<seed>/<method>/``:
``adapters.safetensors`` + ``adapters.json``, ``ranks.json`` (when the method
planned per-layer ranks, e.g. AIRA), ``train.log`` and, last, ``result.json``:
its presence means the run finished.

The configuration is ``config.py``; what a run records about itself is
``provenance.py``. Errors are plain one-line exceptions; the entry points
(``main.py``) add command-line hints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_adapters, save_adapters
from .config import ExperimentConfig
from .export import export_merged
from .files import write_json
from .adapter import adapter_modules
from .inject import apply_adapters, layer_ranks, merge_adapters, method_options
from .models import TINY_CONFIGS, build_clip
from .provenance import RunLog, environment, peak_memory
from .train import evaluate, prepare_device, train_adapters

logger = logging.getLogger(__name__)
RESULT_FILE, ADAPTER_FILE, RANKS_FILE, EVAL_FILE = "result.json", "adapters.safetensors", "ranks.json", "eval.json"


class RunFinishedError(ValueError):
    """The run already has its ``result.json``; training it again needs ``overwrite``."""


def run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/<backbone>/<dataset>/<shots>shots/seed<seed>/<method>[-<run_name>]`` (the sweep uses it too)."""
    leaf = cfg.method if cfg.run_name is None else f"{cfg.method}-{cfg.run_name}"
    return (Path(cfg.output_dir) / cfg.backbone.replace("/", "-") / cfg.dataset / f"{cfg.shots}shots"
            / f"seed{cfg.seed}" / leaf)


def read_result(folder: Path) -> dict[str, Any] | None:
    """The run's ``result.json`` if it is complete (valid JSON with an accuracy), else None."""
    try:
        result = json.loads((Path(folder) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("accuracy"), (int, float)) else None


def is_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` finished (a truncated or corrupt result.json does not count)."""
    return read_result(folder) is not None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"results dir is not writable: {folder} ({err.strerror or err})") from None


def run_experiment(cfg: ExperimentConfig, *, eval_only: bool = False, export_path=None, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Train (or with ``eval_only`` reload) and evaluate one run; returns the result dictionary.

    A finished run (``result.json`` present) is not trained again unless ``overwrite``; a run that
    stops early (error, NaN loss, kill) leaves no ``result.json``, and its partial files are replaced
    when it runs again.
    """
    from datasets import build_data_loader, build_dataset, build_test_transform, build_train_transform

    started = time.perf_counter()
    out = run_dir(cfg)
    adapters_path = out / ADAPTER_FILE
    if eval_only:
        if not adapters_path.is_file():
            raise ValueError(f"no adapters to evaluate at {adapters_path}; train this run first")
    elif is_finished(out) and not overwrite:
        raise RunFinishedError(f"run already finished: {out / RESULT_FILE} exists")
    _check_writable(out)
    device = resolve_device(cfg.device)
    prepare_device(device)
    with RunLog(out / ("eval.log" if eval_only else "train.log")):
        logger.info("run %s | %s on %s", out, cfg.method, device)
        seed_everything(cfg.seed)
        ds = build_dataset(cfg.dataset, cfg.root_path, shots=cfg.shots, seed=cfg.seed)
        backbone = build_clip(cfg.backbone, cfg.pretrained, device, seed=cfg.backbone_seed)
        model = backbone.model
        class_tokens = backbone.tokenizer(ds.prompts(cfg.template))
        test_transform = build_test_transform(model)
        test_loader = build_data_loader(ds.test, test_transform, batch_size=cfg.eval_batch_size,
                                        num_workers=cfg.num_workers)
        result: dict[str, Any] = {"method": cfg.method, "dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed,
                                  "backbone": cfg.backbone, "device": str(device),
                                  "pretrained": None if cfg.backbone in TINY_CONFIGS else cfg.pretrained}
        spec, method_config, schedule_options = method_options(cfg.method, cfg.method_options)
        if eval_only:
            meta = load_adapters(model, adapters_path)
            if meta["layer"] != spec.layer:
                raise ValueError(f"{adapters_path} holds {meta['layer']} adapters, not {spec.layer} ({cfg.method})")
        else:
            result["zero_shot_accuracy"] = evaluate(model, test_loader, class_tokens, device, cfg.train.amp)
            logger.info("zero-shot top-1 %.2f%% on %d test images", result["zero_shot_accuracy"], len(ds.test))
            stats = None
            if method_config.needs_calibration:
                calib = build_data_loader(ds.train_x, test_transform, batch_size=cfg.eval_batch_size,
                                          num_workers=cfg.num_workers)
                from .calibration import collect_activation_stats
                stats = collect_activation_stats(
                    model, image_batches=(x for x, _ in calib) if "vision" in cfg.encoders else None,
                    text_batches=[class_tokens] if "text" in cfg.encoders else None,
                    targets=cfg.targets, layers=cfg.layers)
            seed_everything(cfg.seed)
            apply_adapters(model, cfg.method, encoders=cfg.encoders, targets=cfg.targets, layers=cfg.layers,
                           stats=stats, **cfg.method_options)
            logger.info("%s adapters on %d layers", cfg.method, len(adapter_modules(model)))
            train_loader = build_data_loader(ds.train_x, build_train_transform(model), batch_size=cfg.train.batch_size,
                                             shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed)
            trained = train_adapters(model, train_loader, class_tokens, cfg.train, iterations=cfg.total_iterations,
                                     device=device, seed=cfg.seed, text_adapted="text" in cfg.encoders,
                                     progress=progress)
            result.update(trainable_params=trained.trainable_params, optimizer_groups=trained.optimizer_groups,
                          iterations=trained.iterations,
                          train_seconds=trained.seconds, iterations_per_second=trained.iterations_per_second,
                          final_loss=trained.final_loss, loss_history=trained.loss_history,
                          hooks_summary=trained.hooks_summary, optimizer=cfg.optimizer,
                          method_config={**method_config.to_dict(),
                                         **(schedule_options.to_dict() if schedule_options else {})})
        mergeable = all(a.mergeable for a in adapter_modules(model).values())
        if mergeable:
            merge_adapters(model)
        result["merged"] = mergeable
        result["accuracy"] = evaluate(model, test_loader, class_tokens, device, cfg.train.amp)
        result["test_images"] = len(ds.test)
        subset = "\n".join(f"{Path(d.impath).relative_to(ds.dataset_dir)}|{d.label}" for d in ds.train_x)
        result["train_subset_sha1"] = hashlib.sha1(subset.encode()).hexdigest()
        result["train_images"] = len(ds.train_x)
        if not eval_only:
            save_adapters(model, adapters_path)
            result["files"] = {"adapters": ADAPTER_FILE, "log": "train.log"}
            if any("rank" in o for o in model.lora_zoo_setup.layer_overrides.values()):  # a planned allocation
                write_json(out / RANKS_FILE, layer_ranks(model))
                result["files"]["ranks"] = RANKS_FILE
        if export_path is not None:
            plain = build_clip(cfg.backbone, None, "cpu", seed=cfg.backbone_seed).model  # keys and shapes only
            result["exported_merged"] = str(export_merged(model, export_path, reference=plain))
            logger.info("exported merged plain open_clip weights to %s", export_path)
        result.update(peak_memory(device), wall_seconds=time.perf_counter() - started,
                      config=cfg.to_dict(), **environment())
        zero_shot = result.get("zero_shot_accuracy")
        result["summary"] = (f"{cfg.method} {cfg.dataset} {cfg.shots}-shot seed {cfg.seed} ({cfg.backbone}): "
                             + (f"zero-shot {zero_shot:.2f}% -> " if zero_shot is not None else "eval only: ")
                             + f"top-1 {result['accuracy']:.2f}%"
                             + (f" | {result['iterations']} it in {result['train_seconds']:.1f}s "
                                f"({result['iterations_per_second']:.2f} it/s), {result['trainable_params']:,} "
                                "trainable params" if not eval_only else "") + f" | {out}")
        write_json(out / (EVAL_FILE if eval_only else RESULT_FILE), result)  # last: its presence = finished
        logger.info(result["summary"])
    return result
