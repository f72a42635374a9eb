"""One few-shot CLIP adaptation experiment, from an ``ExperimentConfig`` to ``result.json``.

Implements the protocol of docs/METHODS.md ("Experiment protocol"; CLIP-LoRA, Zanella &
Ben Ayed, CVPRW 2024; NoRA and AIRA, Li et al., ICCV 2025): open_clip backbone →
few-shot split (``datasets``) → zero-shot accuracy with the same prompts (computed
once per backbone, weights, dataset, prompts and test split, then read from a small
cache under ``output_dir/.cache``) → calibration statistics when the method needs
them → ``apply_adapters`` → the one training loop (``train.py``) → merge → top-1 on
the full test split. Outputs, atomically, in ``run_dir(cfg)``:
``adapters.safetensors`` + ``adapters.json``, ``ranks.json`` (a planned per-layer rank
allocation, e.g. AIRA's), ``curves.csv``, ``train.log`` and, last, ``result.json``:
a readable ``result.json`` means the run finished.

Nothing is written before the data and the weights are found (a run that fails on
its inputs leaves no folder). During training a checkpoint is written every
``checkpoint_every`` iterations; a killed run started again continues from it and
ends as the uninterrupted run would (``resume.py``). The configuration is
``config.py``; what a run records about itself is ``provenance.py``. Errors are
plain one-line exceptions; the entry points (``main.py``) add command-line hints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import resume as resume_state
from .adapter import adapter_modules
from .calibration import collect_activation_stats
from .checkpoint import load_adapters, save_adapters
from .config import ExperimentConfig
from .export import export_merged
from .files import write_json
from .inject import apply_adapters, layer_ranks, merge_adapters, method_options
from .metrics import Sinks, check_sinks, write_curves
from .models import build_clip, weights_file
from .provenance import RunLog, environment, peak_memory
from .results import first_difference, setting_of
from .targets import check_layers
from .train import evaluate, prepare_device, train_adapters

logger = logging.getLogger(__name__)
RESULT_FILE, ADAPTER_FILE, RANKS_FILE, EVAL_FILE = "result.json", "adapters.safetensors", "ranks.json", "eval.json"
STATE_FILE = "checkpoint.pt"
#: config keys that define the adapted model: an evaluation of a saved run must not change them
MODEL_KEYS = ("pretrained", "backbone_seed", "encoders", "targets", "layers")
#: config keys an evaluation may set (how it evaluates, not what)
EVAL_KEYS = ("device", "eval_batch_size", "num_workers", "template", "test_cache_dir", "threads")


class RunFinishedError(ValueError):
    """The run already has a readable ``result.json``; training it again needs ``overwrite``."""


def dataset_name(cfg: ExperimentConfig) -> str:
    """The dataset as results name it: the registered name, and for ``imagefolder`` the folder's name too
    (``imagefolder-birds``), since there the folder is the dataset."""
    return f"imagefolder-{Path(cfg.root_path).resolve().name}" if cfg.dataset == "imagefolder" else cfg.dataset


def run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/<backbone>/<dataset>/<shots>shots/seed<seed>/<method>[-<run_name>]`` (the sweep uses it too);
    ``<dataset>`` is ``dataset_name(cfg)``."""
    leaf = cfg.method if cfg.run_name is None else f"{cfg.method}-{cfg.run_name}"
    return (Path(cfg.output_dir) / cfg.backbone.replace("/", "-") / dataset_name(cfg) / f"{cfg.shots}shots"
            / f"seed{cfg.seed}" / leaf)


def read_result(folder: Path) -> dict[str, Any] | None:
    """The run's ``result.json`` if it is complete (valid JSON with an accuracy), else None."""
    try:
        result = json.loads((Path(folder) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("accuracy"), (int, float)) else None


def recorded_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """The optimizer and the resolved method options (layer and schedule) as ``result.json`` records them."""
    _, method_config, schedule_options = method_options(cfg.method, cfg.method_options)
    return {"optimizer": cfg.optimizer,
            "method_config": {**method_config.to_dict(), **(schedule_options.to_dict() if schedule_options else {})}}


def run_setting(cfg: ExperimentConfig) -> tuple:
    """The options that define ``cfg``'s numbers, as ``result.json`` records them (``results.setting_of``)."""
    return setting_of({"config": cfg.to_dict(), **recorded_options(cfg)})


def is_finished(folder: Path, cfg: Optional[ExperimentConfig] = None) -> bool:
    """Whether the run in ``folder`` finished (a truncated or corrupt result.json does not count). With ``cfg``: a
    run finished there with other settings (``results.setting_of``) is an error naming the first difference."""
    saved = read_result(folder)
    if saved is None:
        return False
    if cfg is not None and isinstance(saved.get("config"), dict):
        difference = first_difference(setting_of(saved), run_setting(cfg))
        if difference:
            raise ValueError(f"{Path(folder) / RESULT_FILE} is a finished run with other settings ({difference}); "
                             "give --run_name NAME to keep both, or --overwrite to replace it")
    return True


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
    except OSError as err:
        raise ValueError(f"results dir is not writable: {folder} ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"results dir is not writable: {folder}")


def _check_export(method: str, method_config, path) -> None:
    """Refuse an export that would fail after training: a batch-dependent method or an unwritable path."""
    if not method_config.mergeable:
        raise ValueError(f"cannot export merged weights: {method} with these options depends on the batch and "
                         "cannot be folded into plain weights")
    existing = Path(path).expanduser().resolve().parent  # nothing is created before the run has its inputs
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK) or Path(path).is_dir():
        raise ValueError(f"export path is not writable: {path}")


def _saved_run(out: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """The finished run an evaluation reloads; a one-line error if it is missing or the request changes it."""
    saved = read_result(out)
    if saved is None or not (out / ADAPTER_FILE).is_file():
        raise ValueError(f"no finished run to evaluate at {out} (train it first)")
    requested = cfg.to_dict()
    for key in MODEL_KEYS:
        if requested[key] != saved["config"].get(key):
            raise ValueError(f"the run at {out} was trained with {key}={saved['config'].get(key)!r}; evaluating "
                             f"it with {key}={requested[key]!r} would evaluate another model")
    layer_config = method_options(cfg.method, cfg.method_options)[1].to_dict()
    for key in cfg.method_options:
        if key in layer_config and layer_config[key] != saved["method_config"].get(key):
            raise ValueError(f"the run at {out} was trained with method_options.{key}="
                             f"{saved['method_config'].get(key)!r}, not {layer_config[key]!r}")
    return {**saved["config"], **{k: requested[k] for k in EVAL_KEYS}}


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _weights_identity(backbone: str, pretrained: Optional[str]) -> Any:
    path = weights_file(backbone, pretrained)
    if path is not None:
        return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
    return pretrained


def zero_shot_accuracy(cfg: ExperimentConfig, model, loader, prompts, class_tokens, test_split, device) -> tuple[float, bool]:
    """``(accuracy, from_cache)``: evaluated once per backbone, weights, prompts and test split, then reused."""
    key = {"backbone": cfg.backbone, "weights": _weights_identity(cfg.backbone, cfg.pretrained),
           "backbone_seed": cfg.backbone_seed if cfg.pretrained is None else None, "dataset": cfg.dataset,
           "prompts": _digest(prompts), "test": _digest([(d.impath, d.label) for d in test_split]),
           "device": device.type, "amp": bool(cfg.train.amp and device.type == "cuda")}
    path = Path(cfg.output_dir) / ".cache" / "zero_shot" / f"{_digest(key)}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return float(cached["accuracy"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    accuracy = evaluate(model, loader, class_tokens, device, cfg.train.amp)
    write_json(path, {"key": key, "accuracy": accuracy})
    return accuracy, False


def _calibration(cfg, method_config, model, ds, class_tokens, test_loader_of, train_stream_of):
    """Calibration statistics for methods that need them (only the adapted towers).

    Standard: the few-shot train images with the test transform and every class prompt, padding
    excluded. ``calibration="authors"`` (their NoRA/AIRA code): the first augmented training batch
    and one class prompt chosen by the run's seed, padding included.
    """
    if not method_config.needs_calibration:
        return None
    authors = getattr(method_config, "calibration", "standard") == "authors"
    if authors:
        images = [next(iter(train_stream_of(0)))[0]]
        index = random.Random(cfg.seed).randrange(len(ds.classnames))
        texts = [class_tokens[index:index + 1]]
    else:
        images, texts = (x for x, _ in test_loader_of(ds.train_x)), [class_tokens]
    return collect_activation_stats(model, image_batches=images if "vision" in cfg.encoders else None,
                                    text_batches=texts if "text" in cfg.encoders else None,
                                    targets=cfg.targets, layers=cfg.layers, include_padding=authors)


def run_experiment(cfg: ExperimentConfig, *, eval_only: bool = False, export_path=None, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Train (or with ``eval_only`` reload) and evaluate one run; returns the result dictionary.

    A finished run is not trained again unless ``overwrite`` (``RunFinishedError``); a run that
    stopped early resumes from its last checkpoint.
    """
    from datasets import build_data_loader, build_dataset, build_test_transform, build_train_transform
    from datasets.cache import DecodedImages, PreprocessedImages
    from datasets.loader import TrainStream, default_num_workers

    started = time.perf_counter()
    out = run_dir(cfg)
    if not eval_only and not overwrite and is_finished(out, cfg):
        if export_path is None:
            raise RunFinishedError(f"run already finished: {out / RESULT_FILE} exists")
        eval_only = True  # exporting a finished run: its saved adapters, evaluated and exported, not retrained
    saved_config = _saved_run(out, cfg) if eval_only else None
    method_config = method_options(cfg.method, cfg.method_options)[1]
    if export_path is not None:
        _check_export(cfg.method, method_config, export_path)
    check_sinks(cfg.log_to)
    device = resolve_device(cfg.device)
    workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device.type)
    threads = prepare_device(device, cfg.threads, workers)
    with RunLog() as log:
        seed_everything(cfg.seed)
        ds = build_dataset(cfg.dataset, cfg.root_path, shots=cfg.shots, seed=cfg.seed)
        backbone = build_clip(cfg.backbone, cfg.pretrained, device, seed=cfg.backbone_seed)
        model = backbone.model
        check_layers(model, cfg.encoders, cfg.layers)  # before the zero-shot pass, not after it
        prompts = ds.prompts(cfg.template)
        class_tokens = backbone.tokenizer(prompts)
        test_transform = build_test_transform(model)
        if cfg.test_cache_dir is not None:
            test_loader = PreprocessedImages(ds.test, test_transform, cfg.test_cache_dir, cfg.eval_batch_size)
        else:
            test_loader = build_data_loader(ds.test, test_transform, batch_size=cfg.eval_batch_size, num_workers=workers)
        _check_writable(out)
        state_path = out / STATE_FILE
        if overwrite and not eval_only:  # a killed retraining must not leave the old result looking finished
            for stale in (state_path, out / RESULT_FILE, out / EVAL_FILE):
                stale.unlink(missing_ok=True)
        setting = run_setting(cfg)
        state = None if eval_only else resume_state.load(state_path, setting)
        log.attach(out / ("eval.log" if eval_only else "train.log"), append=state is not None)
        logger.info("run %s | %s on %s (%d threads, %d loader workers)", out, cfg.method, device, threads, workers)
        result: dict[str, Any] = {"method": cfg.method, "dataset": dataset_name(cfg), "shots": cfg.shots, "seed": cfg.seed,
                                  "run_name": cfg.run_name, "backbone": cfg.backbone, "pretrained": cfg.pretrained,
                                  "device": str(device), "threads": threads, "num_workers": workers}
        if eval_only:
            load_adapters(model, out / ADAPTER_FILE)
        else:
            result["zero_shot_accuracy"], result["zero_shot_cached"] = zero_shot_accuracy(
                cfg, model, test_loader, prompts, class_tokens, ds.test, device)
            logger.info("zero-shot top-1 %.2f%% on %d test images%s", result["zero_shot_accuracy"], len(ds.test),
                        " (cached)" if result["zero_shot_cached"] else "")
            images = DecodedImages(ds.train_x, cfg.train_cache_mb)
            train_transform = build_train_transform(model)

            def train_stream(start_step):
                return TrainStream(ds.train_x, train_transform, cfg.train.batch_size, cfg.seed, num_workers=workers,
                                   start_step=start_step, images=images)

            stats = _calibration(cfg, method_config, model, ds, class_tokens,
                                 lambda data: build_data_loader(data, test_transform, batch_size=cfg.eval_batch_size,
                                                                num_workers=workers, images=images), train_stream)
            seed_everything(cfg.seed)
            apply_adapters(model, cfg.method, encoders=cfg.encoders, targets=cfg.targets, layers=cfg.layers,
                           stats=stats, **cfg.method_options)
            logger.info("%s adapters on %d layers; %d of %d train images decoded in memory", cfg.method,
                        len(adapter_modules(model)), len(images), len(ds.train_x))
            sinks = Sinks(cfg.log_to, out, out.name, cfg.to_dict())
            try:
                trained = train_adapters(
                    model, train_stream(state["step"] if state else 0), class_tokens, cfg.train,
                    iterations=cfg.total_iterations, device=device, seed=cfg.seed, text_adapted="text" in cfg.encoders,
                    progress=progress, resume=state, on_log=sinks.log,
                    checkpoint=lambda s: (resume_state.save(state_path, {**s, "setting": setting}),
                                          write_curves(out, s["history"])))
            finally:
                sinks.close()
            write_curves(out, trained.curves)
            result.update(trainable_params=trained.trainable_params, optimizer_groups=trained.optimizer_groups,
                          iterations=trained.iterations, resumed_from=trained.resumed_from,
                          train_seconds=trained.seconds, iterations_per_second=trained.iterations_per_second,
                          final_loss=trained.final_loss, loss_history=trained.loss_history,
                          hooks_summary=trained.hooks_summary, **recorded_options(cfg))
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
            save_adapters(model, out / ADAPTER_FILE)
            result["files"] = {"adapters": ADAPTER_FILE, "log": "train.log", "curves": "curves.csv"}
            if any("rank" in o for o in model.lora_zoo_setup.layer_overrides.values()):  # a planned allocation
                write_json(out / RANKS_FILE, layer_ranks(model))
                result["files"]["ranks"] = RANKS_FILE
        if export_path is not None:
            plain = build_clip(cfg.backbone, None, "cpu", seed=cfg.backbone_seed).model  # keys and shapes only
            result["exported_merged"] = str(export_merged(model, export_path, reference=plain))
            logger.info("exported merged plain open_clip weights to %s", export_path)
        result.update(peak_memory(device), wall_seconds=time.perf_counter() - started,
                      config=saved_config if eval_only else cfg.to_dict(), **environment())
        zero_shot = result.get("zero_shot_accuracy")
        result["summary"] = (f"{cfg.method} {dataset_name(cfg)} {cfg.shots}-shot seed {cfg.seed} ({cfg.backbone}): "
                             + (f"zero-shot {zero_shot:.2f}% -> " if zero_shot is not None else "eval only: ")
                             + f"top-1 {result['accuracy']:.2f}%"
                             + (f" | {result['iterations'] - result['resumed_from']} it"
                                + (f" (resumed at {result['resumed_from']})" if result["resumed_from"] else "")
                                + f" in {result['train_seconds']:.1f}s "
                                f"({result['iterations_per_second']:.2f} it/s), {result['trainable_params']:,} "
                                "trainable params" if not eval_only else "") + f" | {out}")
        write_json(out / (EVAL_FILE if eval_only else RESULT_FILE), result)  # last: its presence = finished
        if state_path.exists() and not eval_only:
            state_path.unlink()  # the finished run needs no checkpoint
        logger.info(result["summary"])
    return result
