"""One few-shot CLIP adaptation experiment, from an ``ExperimentConfig`` to ``result.json``, as named stages.

Implements the protocol of docs/METHODS.md ("Experiment protocol"; CLIP-LoRA, Zanella &
Ben Ayed, CVPRW 2024; NoRA and AIRA, Li et al., ICCV 2025). ``run_experiment`` reads as
its stages, each a function with explicit inputs and outputs:

1. ``prepare_data``: the few-shot split (``datasets``) and the evaluation plan (``evaluation.py``);
2. ``build_model``: the open_clip backbone, its layers checked before any work;
3. ``open_run_folder``: the run folder, its log, and the checkpoint a killed run resumes from;
4. ``zero_shot``: the pretrained model on every evaluation (cached per backbone, weights, prompts, test set);
5. ``adapt``: calibration statistics when the method needs them, then ``apply_adapters``;
6. ``train``: the one training loop (``train.py``), checkpointing as it goes;
7. ``evaluate_plan``: merge, then top-1 on every evaluation of the plan;
8. ``save_outputs`` and ``export``: adapters, rank allocation, merged weights;
9. ``finish``: ``result.json`` (or ``eval.json`` for an evaluation), written last and atomically.

Nothing is written before the data and the weights are found (a run that fails on its
inputs leaves no folder). Where runs live and how a finished one is recognised is
``runs.py``; what a run records about itself is ``provenance.py``. Errors are plain
one-line exceptions; the command line (``cli.py``) prints them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import resume as resume_state
from .adapter import adapter_modules
from .calibration import collect_activation_stats
from .checkpoint import load_adapters, save_adapters
from .config import ExperimentConfig
from .errors import RunFinishedError
from .evaluation import Evaluation, few_shot_plan, test_loader, zero_shot_accuracy
from .export import export_merged
from .files import write_json
from .inject import apply_adapters, layer_ranks, merge_adapters, method_options
from .metrics import Sinks, check_sinks, write_curves
from .models import Backbone, build_clip, check_weights
from .provenance import RunLog, environment, peak_memory
from .runs import (ADAPTER_FILE, EVAL_FILE, RANKS_FILE, RESULT_FILE, STATE_FILE, dataset_name, is_finished,
                   recorded_options, run_dir, run_setting, saved_config)
from .targets import check_layers
from .train import evaluate, prepare_device, train_adapters

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a run trains and is evaluated on."""

    ds: Any                 # datasets.FewShotDataset: train_x is the few-shot set
    prompts: list[str]      # one per training class, in label order
    plan: list[Evaluation]  # what it is evaluated on


@dataclass
class Evaluator:
    """The plan with what scoring it needs: class tokens and a test loader per evaluation."""

    plan: list[Evaluation]
    tokens: list[torch.Tensor]
    loaders: list[Any]


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


# ---- the stages ---------------------------------------------------------------------------------
def prepare_data(cfg: ExperimentConfig) -> RunData:
    """The few-shot split of the dataset and the evaluation plan (the few-shot protocol's: its test split)."""
    from datasets import build_dataset

    ds = build_dataset(cfg.dataset, cfg.root_path, shots=cfg.shots, seed=cfg.seed)
    return RunData(ds, ds.prompts(cfg.template), few_shot_plan(cfg, ds))


def build_model(cfg: ExperimentConfig, device: torch.device) -> Backbone:
    """The backbone, with the adapted layers checked before any work (not after the zero-shot pass)."""
    backbone = build_clip(cfg.backbone, cfg.pretrained, device, seed=cfg.backbone_seed)
    check_layers(backbone.model, cfg.encoders, cfg.layers)
    return backbone


def build_evaluator(cfg: ExperimentConfig, backbone: Backbone, plan: list[Evaluation], workers: int) -> Evaluator:
    from datasets import build_test_transform

    transform = build_test_transform(backbone.model)
    return Evaluator(plan, [backbone.tokenizer(list(e.prompts)) for e in plan],
                     [test_loader(cfg, e.test, transform, workers) for e in plan])


def open_run_folder(cfg: ExperimentConfig, out: Path, log: RunLog, eval_only: bool, overwrite: bool) -> Optional[dict]:
    """Create the run folder (its inputs are found by now), start its log; returns the checkpoint to resume
    from (None: start afresh). ``overwrite`` removes what would make a killed retraining look finished."""
    _check_writable(out)
    state_path = out / STATE_FILE
    if overwrite and not eval_only:
        for stale in (state_path, out / RESULT_FILE, out / EVAL_FILE):
            stale.unlink(missing_ok=True)
    state = None if eval_only else resume_state.load(state_path, run_setting(cfg))
    log.attach(out / ("eval.log" if eval_only else "train.log"), append=state is not None)
    return state


def zero_shot(cfg: ExperimentConfig, model, evaluator: Evaluator, device) -> dict[str, Any]:
    """The pretrained model's accuracy on every evaluation of the plan (cached)."""
    record: dict[str, Any] = {}
    for evaluation, tokens, loader in zip(evaluator.plan, evaluator.tokens, evaluator.loaders):
        accuracy, cached = zero_shot_accuracy(cfg, model, loader, evaluation, tokens, device)
        record[f"zero_shot_{evaluation.prefix}accuracy"], record[f"zero_shot_{evaluation.prefix}cached"] = accuracy, cached
        logger.info("zero-shot top-1 %.2f%% on %d %s images%s", accuracy, len(evaluation.test), evaluation.name,
                    " (cached)" if cached else "")
    return record


def train_stream_factory(cfg: ExperimentConfig, ds, model, workers: int) -> tuple[Any, Callable[[int], Any]]:
    """``(decoded images, stream(start_step))``: the few-shot train set decoded once, and its augmented batches."""
    from datasets import build_train_transform
    from datasets.cache import DecodedImages
    from datasets.loader import TrainStream

    images = DecodedImages(ds.train_x, cfg.train_cache_mb)
    transform = build_train_transform(model)

    def stream(start_step: int):
        return TrainStream(ds.train_x, transform, cfg.train.batch_size, cfg.seed, num_workers=workers,
                           start_step=start_step, images=images)

    return images, stream


def adapt(cfg: ExperimentConfig, model, ds, class_tokens: torch.Tensor, images, stream, workers: int) -> None:
    """Calibration statistics for methods that need them (only the adapted towers), then the adapters.

    Standard: the few-shot train images with the test transform and every class prompt, padding
    excluded. ``calibration="authors"`` (their NoRA/AIRA code): the first augmented training batch
    and one class prompt chosen by the run's seed, padding included.
    """
    from datasets import build_data_loader, build_test_transform

    method_config = method_options(cfg.method, cfg.method_options)[1]
    stats = None
    if method_config.needs_calibration:
        authors = getattr(method_config, "calibration", "standard") == "authors"
        if authors:
            image_batches = [next(iter(stream(0)))[0]]
            index = random.Random(cfg.seed).randrange(len(ds.classnames))
            text_batches = [class_tokens[index:index + 1]]
        else:
            loader = build_data_loader(ds.train_x, build_test_transform(model), batch_size=cfg.eval_batch_size,
                                       num_workers=workers, images=images)
            image_batches, text_batches = (x for x, _ in loader), [class_tokens]
        stats = collect_activation_stats(model, image_batches=image_batches if "vision" in cfg.encoders else None,
                                         text_batches=text_batches if "text" in cfg.encoders else None,
                                         targets=cfg.targets, layers=cfg.layers, include_padding=authors)
    seed_everything(cfg.seed)
    apply_adapters(model, cfg.method, encoders=cfg.encoders, targets=cfg.targets, layers=cfg.layers, stats=stats,
                   **cfg.method_options)
    logger.info("%s adapters on %d layers; %d of %d train images decoded in memory", cfg.method,
                len(adapter_modules(model)), len(images), len(ds.train_x))


def train(cfg: ExperimentConfig, model, class_tokens: torch.Tensor, stream, state: Optional[dict], out: Path,
          device: torch.device, progress: bool) -> dict[str, Any]:
    """The one training loop, checkpointing every ``checkpoint_every`` iterations; returns what it records."""
    setting, state_path = run_setting(cfg), out / STATE_FILE
    sinks = Sinks(cfg.log_to, out, out.name, cfg.to_dict())
    try:
        trained = train_adapters(
            model, stream(state["step"] if state else 0), class_tokens, cfg.train, iterations=cfg.total_iterations,
            device=device, seed=cfg.seed, text_adapted="text" in cfg.encoders, progress=progress, resume=state,
            on_log=sinks.log, checkpoint=lambda s: (resume_state.save(state_path, {**s, "setting": setting}),
                                                    write_curves(out, s["history"])))
    finally:
        sinks.close()
    write_curves(out, trained.curves)
    return dict(trainable_params=trained.trainable_params, optimizer_groups=trained.optimizer_groups,
                iterations=trained.iterations, resumed_from=trained.resumed_from, train_seconds=trained.seconds,
                iterations_per_second=trained.iterations_per_second, final_loss=trained.final_loss,
                precision=cfg.train.precision, skipped_steps=trained.skipped_steps,
                loss_history=trained.loss_history, hooks_summary=trained.hooks_summary, **recorded_options(cfg))


def evaluate_plan(cfg: ExperimentConfig, model, evaluator: Evaluator, device: torch.device) -> dict[str, Any]:
    """Merge the adapters where they can be, then top-1 on every evaluation of the plan."""
    mergeable = all(a.mergeable for a in adapter_modules(model).values())
    if mergeable:
        merge_adapters(model)
    record: dict[str, Any] = {"merged": mergeable}
    for evaluation, tokens, loader in zip(evaluator.plan, evaluator.tokens, evaluator.loaders):
        record[f"{evaluation.prefix}accuracy"] = evaluate(model, loader, tokens, device, cfg.train.precision)
        record[f"{evaluation.prefix}test_images"] = len(evaluation.test)
    return record


def train_subset_record(ds) -> dict[str, Any]:
    """Which images the adapters were trained on: a digest of their paths (relative) and labels, and their count."""
    subset = "\n".join(f"{Path(d.impath).relative_to(ds.dataset_dir)}|{d.label}" for d in ds.train_x)
    return {"train_subset_sha1": hashlib.sha1(subset.encode()).hexdigest(), "train_images": len(ds.train_x)}


def save_outputs(model, out: Path) -> dict[str, Any]:
    """The trained adapters and, for a planned rank allocation (AIRA's), the per-layer ranks."""
    save_adapters(model, out / ADAPTER_FILE)
    files = {"adapters": ADAPTER_FILE, "log": "train.log", "curves": "curves.csv"}
    if any("rank" in o for o in model.lora_zoo_setup.layer_overrides.values()):
        write_json(out / RANKS_FILE, layer_ranks(model))
        files["ranks"] = RANKS_FILE
    return {"files": files}


def export(cfg: ExperimentConfig, model, export_path) -> dict[str, Any]:
    """The adapted model as plain open_clip weights (merged), checked against a plain model's keys and shapes."""
    plain = build_clip(cfg.backbone, None, "cpu", seed=cfg.backbone_seed).model  # keys and shapes only
    path = export_merged(model, export_path, reference=plain)
    logger.info("exported merged plain open_clip weights to %s", export_path)
    return {"exported_merged": str(path)}


def summary(cfg: ExperimentConfig, record: dict[str, Any], plan: list[Evaluation], out: Path) -> str:
    """One line: the run, then per evaluation zero-shot -> top-1, then the training figures."""
    scores = []
    for e in plan:
        zero_shot_score = record.get(f"zero_shot_{e.prefix}accuracy")
        scores.append((f"{e.name}: " if len(plan) > 1 else "")
                      + (f"zero-shot {zero_shot_score:.2f}% -> " if zero_shot_score is not None else "eval only: ")
                      + f"top-1 {record[f'{e.prefix}accuracy']:.2f}%")
    line = f"{cfg.method} {dataset_name(cfg)} {cfg.shots}-shot seed {cfg.seed} ({cfg.backbone}): " + "; ".join(scores)
    if "iterations" in record:
        resumed = record["resumed_from"]
        line += (f" | {record['iterations'] - resumed} it" + (f" (resumed at {resumed})" if resumed else "")
                 + f" in {record['train_seconds']:.1f}s ({record['iterations_per_second']:.2f} it/s), "
                 f"{record['trainable_params']:,} trainable params")
    return f"{line} | {out}"


def finish(out: Path, record: dict[str, Any], eval_only: bool) -> None:
    """Write the record last (its presence means finished) and drop the checkpoint a finished run needs no more."""
    write_json(out / (EVAL_FILE if eval_only else RESULT_FILE), record)
    if not eval_only:
        (out / STATE_FILE).unlink(missing_ok=True)
    logger.info(record["summary"])


# ---- the run ------------------------------------------------------------------------------------
def run_experiment(cfg: ExperimentConfig, *, eval_only: bool = False, export_path=None, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Train (or with ``eval_only`` reload) and evaluate one run; returns the result dictionary.

    A finished run is not trained again unless ``overwrite`` (``RunFinishedError``); exporting a finished
    run evaluates and exports its saved adapters; a run that stopped early resumes from its last checkpoint.
    """
    started, out = time.perf_counter(), run_dir(cfg)
    if not eval_only and not overwrite and is_finished(out, cfg):
        if export_path is None:
            raise RunFinishedError(f"run already finished: {out / RESULT_FILE} exists")
        eval_only = True
    config = saved_config(out, cfg) if eval_only else cfg.to_dict()
    if export_path is not None:
        _check_export(cfg.method, method_options(cfg.method, cfg.method_options)[1], export_path)
    check_sinks(cfg.log_to)
    check_weights(cfg.backbone, cfg.pretrained)  # missing weights offline: one line now, not after the data
    device = resolve_device(cfg.device)
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    threads = prepare_device(device, cfg.threads, workers)
    with RunLog() as log:
        seed_everything(cfg.seed)
        data = prepare_data(cfg)
        backbone = build_model(cfg, device)
        model, class_tokens = backbone.model, backbone.tokenizer(data.prompts)
        evaluator = build_evaluator(cfg, backbone, data.plan, workers)
        state = open_run_folder(cfg, out, log, eval_only, overwrite)
        logger.info("run %s | %s on %s (%d threads, %d loader workers)", out, cfg.method, device, threads, workers)
        record: dict[str, Any] = {"method": cfg.method, "dataset": dataset_name(cfg), "shots": cfg.shots,
                                  "seed": cfg.seed, "run_name": cfg.run_name, "backbone": cfg.backbone,
                                  "pretrained": cfg.pretrained, "device": str(device), "threads": threads,
                                  "num_workers": workers}
        if eval_only:
            load_adapters(model, out / ADAPTER_FILE)
        else:
            record.update(zero_shot(cfg, model, evaluator, device))
            images, stream = train_stream_factory(cfg, data.ds, model, workers)
            adapt(cfg, model, data.ds, class_tokens, images, stream, workers)
            record.update(train(cfg, model, class_tokens, stream, state, out, device, progress))
        record.update(evaluate_plan(cfg, model, evaluator, device), **train_subset_record(data.ds))
        if not eval_only:
            record.update(save_outputs(model, out))
        if export_path is not None:
            record.update(export(cfg, model, export_path))
        record.update(peak_memory(device), wall_seconds=time.perf_counter() - started, config=config, **environment())
        record["summary"] = summary(cfg, record, data.plan, out)
        finish(out, record, eval_only)
    return record


def default_workers(device: torch.device) -> int:
    from datasets.loader import default_num_workers

    return default_num_workers(device.type)
