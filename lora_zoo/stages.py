"""The stages of a run (``experiment.run_experiment`` calls them in order), each a function with explicit inputs.

``prepare_data`` reads the few-shot split and builds the evaluation plan of the run's protocol
(``evaluation.py``) plus any other datasets it is evaluated on; ``build_model`` builds the backbone
and checks the adapted layers and the method's shapes before any work; ``zero_shot`` scores the
pretrained model; ``check_task`` checks the method against the task (a head's memory, a validation split to
select on); ``training_stream`` and ``adapt`` prepare the augmented batches (or a head's features,
encoded once and cached on disk), the calibration statistics and the method (``kinds.apply_method``: any
kind); ``fit`` runs the one training loop (none for a method with nothing to train); ``after_training``
runs the method's post-training selection (``Scorer.after_training``: Tip-Adapter's α/β search on the
validation split; a no-op for the others); ``evaluate_plan`` and
``evaluate_targets`` score the adapted model; ``save_outputs`` and the exports write what the run
produced. Nothing here decides what a request does (train or reload, which files): that is
``experiment.py``.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import resume as resume_state
from .calibration import collect_activation_stats
from .checkpoint import RECORD_DIGEST, read_adapter_config, save_adapters
from .config import ExperimentConfig, batches_per_epoch
from .evaluation import (Evaluation, base_to_new_plan, evaluate, few_shot_plan, target_plan, test_loader,
                         zero_shot_accuracy)
from .features import FeatureStream, cached_views, support_views
from .files import write_json
from .inject import layer_ranks
from .kinds import apply_method, kind_of, scorer_of
from .learner import Support, Task
from .metrics import Sinks, write_curves
from .models import Backbone, build_clip, weights_identity
from .naming import count_trainable
from .results import harmonic_mean
from .runs import (ADAPTER_FILE, RANKS_FILE, STATE_FILE, dataset_name, method_record, recorded_options, run_setting,
                   target_file)
from .scoring import ClassSet, Selection
from .targets import check_layers
from .train import train_adapters

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a run trains and is evaluated on."""

    ds: Any                 # datasets.FewShotDataset: train_x is the few-shot set (base classes for base2new)
    prompts: list[str]      # one per training class, in label order
    plan: list[Evaluation]  # the protocol's evaluations, then the other datasets' (``target``)

    def classes(self, tokenizer) -> ClassSet:
        """The training classes: names, prompts and their tokens."""
        return ClassSet.of(self.ds.classnames, self.prompts, tokenizer, self.ds.name)


@dataclass
class Scoring:
    """Each evaluation of the plan with what scoring it needs: its classes and its test loader."""

    plan: list[Evaluation]
    classes: list[ClassSet]
    loaders: list[Any]

    @property
    def everything(self) -> list[tuple[Evaluation, ClassSet, Any]]:
        """``(evaluation, classes, loader)`` of every evaluation of the plan."""
        return list(zip(self.plan, self.classes, self.loaders))

    @property
    def protocol(self) -> list[tuple[Evaluation, ClassSet, Any]]:
        """The protocol's evaluations (test; base and new)."""
        return [item for item in self.everything if not item[0].target]

    @property
    def targets(self) -> list[tuple[Evaluation, ClassSet, Any]]:
        """The other datasets' evaluations (``--eval_on``)."""
        return [item for item in self.everything if item[0].target]


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: ExperimentConfig, targets: Sequence[str] = ()) -> RunData:
    """The few-shot split and the protocol's evaluation plan, then ``targets``' whole test splits (all read now:
    a missing dataset is a one-line error before any work)."""
    from datasets import build_dataset, build_test_dataset

    if cfg.protocol == "base2new":
        ds = build_dataset(cfg.dataset, cfg.root_path, shots=cfg.shots, seed=cfg.seed, subsample="base")
        plan = base_to_new_plan(cfg, ds, build_test_dataset(cfg.dataset, cfg.root_path, subsample="new"))
    else:
        ds = build_dataset(cfg.dataset, cfg.root_path, shots=cfg.shots, seed=cfg.seed)
        plan = few_shot_plan(cfg, ds)
    others = [build_test_dataset(name, cfg.root_path) for name in targets]
    return RunData(ds, ds.prompts(cfg.template), plan + target_plan(cfg, others))


def build_model(cfg: ExperimentConfig, device: torch.device, check_options: bool = True) -> Backbone:
    """The backbone; the adapted layers and (``check_options``) the method's options against their shapes are
    checked before any work (a rank above a layer's width: one line, not after the zero-shot pass)."""
    backbone = build_clip(cfg.backbone, cfg.pretrained, device, seed=cfg.backbone_seed)
    check_layers(backbone.model, cfg.encoders, cfg.layers)
    if check_options:
        kind_of(cfg.method).check_fits(backbone.model, cfg.method, cfg.method_options, cfg.encoders, cfg.targets,
                                       cfg.layers)
    return backbone


def check_task(cfg: ExperimentConfig, model, ds, device: torch.device) -> None:
    """The method against what it will train on, before any work (``Learner.check_task``): a head whose features
    would not fit the device's free memory, a selection on a validation split the dataset lacks (one line)."""
    size = len(ds.train_x)
    epochs = -(-cfg.iterations(size) // batches_per_epoch(size, cfg.train.batch_size, cfg.train.drop_last))
    task = Task(dataset_name(cfg), len(ds.classnames), size, len(ds.val), epochs, model.visual.output_dim, device)
    kind_of(cfg.method).check_task(model, cfg.method, cfg.method_options, task)


def build_scoring(cfg: ExperimentConfig, backbone: Backbone, plan: list[Evaluation], workers: int) -> Scoring:
    from datasets import build_test_transform

    transform = build_test_transform(backbone.model)
    return Scoring(plan, [ClassSet.of(e.names, e.prompts, backbone.tokenizer, e.dataset) for e in plan],
                   [test_loader(cfg, e.test, transform, workers) for e in plan])


def zero_shot(cfg: ExperimentConfig, model, items, device) -> tuple[dict[str, Any], dict[str, float]]:
    """The pretrained model's accuracy on each ``(evaluation, classes, loader)`` (cached): ``(result.json keys of
    the protocol's evaluations, {target: accuracy} of the other datasets)``."""
    record: dict[str, Any] = {}
    targets: dict[str, float] = {}
    for evaluation, classes, loader in items:
        accuracy, cached = zero_shot_accuracy(cfg, model, loader, evaluation, classes, device)
        if evaluation.target:
            targets[evaluation.name] = accuracy
        else:
            record[f"zero_shot_{evaluation.prefix}accuracy"] = accuracy
            record[f"zero_shot_{evaluation.prefix}cached"] = cached
        logger.info("zero-shot top-1 %.2f%% on %d %s images%s", accuracy, len(evaluation.test), evaluation.name,
                    " (cached)" if cached else "")
    return record, targets


@dataclass
class TrainingData:
    """What the loop trains on: the few-shot images decoded once, ``stream(start_step)`` (augmented images, or a head's
    cached features), its batches per pass, and a head's ``support`` features (None for the other kinds)."""

    images: Any
    stream: Callable[[int], Any]
    size: int                  # few-shot training images
    per_epoch: int             # batches per pass over them
    support: Optional[Support] = None


def features_key(cfg: ExperimentConfig, data, transform, device) -> dict[str, Any]:
    """What a head's cached training features depend on (``features.cached_views``): the backbone and its weights,
    the images' content, the transform, the seed, the precision, the device type and the encoding batch (taken
    before any image is read: a file changed meanwhile gets a new key)."""
    from datasets.identity import content_key

    return {"backbone": cfg.backbone, "weights": weights_identity(cfg.backbone, cfg.pretrained),
            "backbone_seed": cfg.backbone_seed if cfg.pretrained is None else None, "images": content_key(data),
            "transform": repr(transform), "seed": cfg.seed, "precision": cfg.train.precision,
            "device": device.type, "batch_size": cfg.eval_batch_size}


def training_stream(cfg: ExperimentConfig, ds, model, workers: int, device) -> TrainingData:
    """The few-shot set decoded once and its augmented batches, made on the CPU (PIL, ``loader.TrainStream``) or
    on ``device`` (``device_augment``; the same crops and flips); for a method that trains on frozen features (its
    kind caches them), their features, encoded once and kept on disk for the runs of the same setting
    (``features.cached_views``)."""
    from datasets import build_train_transform
    from datasets.cache import DecodedImages
    from datasets.loader import TrainStream

    train, size = cfg.train, len(ds.train_x)
    per_epoch = batches_per_epoch(size, train.batch_size, train.drop_last)
    images = DecodedImages(ds.train_x, cfg.train_cache_mb)
    transform = build_train_transform(model)
    if kind_of(cfg.method).caches_features:
        epochs = -(-cfg.iterations(size) // per_epoch)
        views = support_views(cfg.method_spec.layer_class, cfg.method_config, epochs)
        support = cached_views(model, ds.train_x, transform, views, cfg.seed, device, train.precision,
                               cfg.eval_batch_size, Path(cfg.output_dir) / ".cache" / "features",
                               features_key(cfg, ds.train_x, transform, device), images=images)
        return TrainingData(images, lambda start: FeatureStream(support, train.batch_size, cfg.seed, start,
                                                                train.drop_last), size, per_epoch, support)
    if cfg.augment_on == "device":
        from datasets.device_augment import DeviceImages, DeviceTrainStream

        on_device = DeviceImages(ds.train_x, device, cfg.train_cache_mb, decoded=images)
        return TrainingData(images, lambda start: DeviceTrainStream(
            ds.train_x, transform, train.batch_size, cfg.seed, device, start_step=start, images=on_device,
            drop_last=train.drop_last), size, per_epoch)
    return TrainingData(images, lambda start: TrainStream(ds.train_x, transform, train.batch_size, cfg.seed,
                                                          num_workers=workers, start_step=start, images=images,
                                                          drop_last=train.drop_last), size, per_epoch)


def adapt(cfg: ExperimentConfig, model, ds, classes: ClassSet, training: TrainingData, workers: int) -> None:
    """Calibration statistics for methods that need them (only the adapted towers), then the method on the model.

    Standard: the few-shot train images with the test transform and every class prompt, padding
    excluded. ``calibration="authors"`` (their NoRA/AIRA code): the first augmented training batch
    and one class prompt chosen by the run's seed, padding included.
    """
    from datasets import build_data_loader, build_test_transform

    stats = None
    if cfg.method_config.needs_calibration:
        authors = getattr(cfg.method_config, "calibration", "standard") == "authors"
        if authors:
            image_batches = [next(iter(training.stream(0)))[0]]
            index = random.Random(cfg.seed).randrange(len(ds.classnames))
            text_batches = [classes.tokens[index:index + 1]]
        else:
            loader = build_data_loader(ds.train_x, build_test_transform(model), batch_size=cfg.eval_batch_size,
                                       num_workers=workers, images=training.images)
            image_batches, text_batches = (x for x, _ in loader), [classes.tokens]
        stats = collect_activation_stats(model, image_batches=image_batches if "vision" in cfg.encoders else None,
                                         text_batches=text_batches if "text" in cfg.encoders else None,
                                         targets=cfg.targets, layers=cfg.layers, include_padding=authors)
    seed_everything(cfg.seed)
    apply_method(model, cfg.method, classes=classes, support=training.support, stats=stats, encoders=cfg.encoders,
                 targets=cfg.targets, layers=cfg.layers, **cfg.method_options)
    logger.info("%s (%s) applied: %d trainable parameters; %d of %d train images decoded in memory", cfg.method,
                cfg.method_spec.kind, count_trainable(model), len(training.images), len(ds.train_x))


def fit(cfg: ExperimentConfig, model, classes: ClassSet, training: TrainingData, state: Optional[dict], out: Path,
        device: torch.device, progress: bool) -> dict[str, Any]:
    """Train: the one loop, checkpointing every ``checkpoint_every`` iterations and at the end (the trained
    adapters stay in the checkpoint until the result is written); returns what it records."""
    setting, state_path = run_setting(cfg), out / STATE_FILE
    threads = resume_state.thread_history(state, torch.get_num_threads(), cfg.iterations(training.size))
    if not scorer_of(model).trains:  # nothing to train (training-free Tip-Adapter): no loop, no checkpoint
        write_curves(out, {"loss": [], "lr": []})
        return dict(trainable_params=0, optimizer_groups=[], iterations=0, resumed_from=0, train_seconds=0.0,
                    iterations_per_second=0.0, final_loss=None, precision=cfg.train.precision, skipped_steps=0,
                    loss_history=[], hooks_summary={}, threads_history=threads, **recorded_options(cfg))
    sinks = Sinks(cfg.log_to, out, out.name, cfg.to_dict())
    try:
        trained = train_adapters(
            model, training.stream(state["step"] if state else 0), classes, cfg.train,
            iterations=cfg.iterations(training.size),
            device=device, seed=cfg.seed, per_epoch=training.per_epoch, progress=progress, resume=state,
            on_log=sinks.log, checkpoint=lambda s: (
                resume_state.save(state_path, {**s, "setting": setting, resume_state.THREADS: threads}),
                write_curves(out, s["history"])))
    finally:
        sinks.close()
    write_curves(out, trained.curves)
    return dict(trainable_params=trained.trainable_params, optimizer_groups=trained.optimizer_groups,
                iterations=trained.iterations, resumed_from=trained.resumed_from, train_seconds=trained.seconds,
                iterations_per_second=trained.iterations_per_second, final_loss=trained.final_loss,
                precision=cfg.train.precision, skipped_steps=trained.skipped_steps, loss_history=trained.loss_history,
                hooks_summary=trained.hooks_summary, threads_history=threads, **recorded_options(cfg))


def after_training(cfg: ExperimentConfig, model, ds, classes: ClassSet, scoring: Scoring, workers: int,
                   device: torch.device) -> dict[str, Any]:
    """The method's step after training, for every method (``Scorer.after_training``; nothing for most): given the
    validation split's batches over the training classes and, only when the method selects on it
    (``selection_splits``), the protocol's test evaluations; returns what ``result.json`` records of it."""
    from datasets import build_data_loader, build_test_transform

    scorer = scorer_of(model)
    val = build_data_loader(ds.val, build_test_transform(model), batch_size=cfg.eval_batch_size,
                            num_workers=workers) if ds.val else None
    test = [(e.name, c, loader) for e, c, loader in scoring.protocol] if "test" in scorer.selection_splits() else []
    return scorer.after_training(model, Selection(classes.to(device), val, test, device, cfg.train.precision))


def merge_for_evaluation(model) -> dict[str, Any]:
    """Merge the method's update where it can be (the evaluated model is then the exported one)."""
    return {"merged": kind_of(model).merge(model)}


def evaluate_plan(cfg: ExperimentConfig, model, items, device: torch.device) -> dict[str, Any]:
    """Top-1 on each of the protocol's evaluations (base-to-new: and the harmonic mean of base and new)."""
    record: dict[str, Any] = {"protocol": cfg.protocol}
    for evaluation, classes, loader in items:
        record[f"{evaluation.prefix}accuracy"] = evaluate(model, loader, classes, device, cfg.train.precision)
        record[f"{evaluation.prefix}test_images"] = len(evaluation.test)
    if cfg.protocol == "base2new":
        record["harmonic_mean"] = harmonic_mean(record["base_accuracy"], record["new_accuracy"])
        record["accuracy"] = record["base_accuracy"]
    return record


def evaluate_targets(cfg: ExperimentConfig, model, items, zero_shots: dict[str, float], out: Path,
                     device: torch.device) -> dict[str, float]:
    """Top-1 on each other dataset (``--eval_on``), each recorded in ``eval_on/<target>.json`` as it finishes."""
    scores = {}
    for evaluation, classes, loader in items:
        accuracy = evaluate(model, loader, classes, device, cfg.train.precision)
        write_json(target_file(out, evaluation.name), {
            "target": evaluation.name, "accuracy": accuracy, "test_images": len(evaluation.test),
            "classes": len(evaluation.prompts), "zero_shot_accuracy": zero_shots.get(evaluation.name),
            "source_dataset": dataset_name(cfg), "method": cfg.method, **method_record(cfg),
            "shots": cfg.shots, "seed": cfg.seed,
            "backbone": cfg.backbone, "run_name": cfg.run_name, "template": cfg.template,
            "precision": cfg.train.precision})
        logger.info("top-1 %.2f%% on %s (%d test images, %d classes)", accuracy, evaluation.name,
                    len(evaluation.test), len(evaluation.prompts))
        scores[evaluation.name] = accuracy
    return scores


def train_subset_record(ds) -> dict[str, Any]:
    """Which images the adapters were trained on: a digest of their paths (relative) and labels, and their count."""
    subset = "\n".join(f"{Path(d.impath).relative_to(ds.dataset_dir)}|{d.label}" for d in ds.train_x)
    record = {"train_subset_sha1": hashlib.sha1(subset.encode()).hexdigest(), "train_images": len(ds.train_x)}
    if ds.class_split is not None:
        record.update(ds.class_split.as_record())
    return record


def save_outputs(model, out: Path) -> dict[str, Any]:
    """The trained adapters (the sha256 of their tensors and of their JSON recorded) and, for a planned rank
    allocation (AIRA's), the ranks."""
    save_adapters(model, out / ADAPTER_FILE)
    files = {"adapters": ADAPTER_FILE, "log": "train.log", "curves": "curves.csv"}
    if any("rank" in o for o in model.lora_zoo_setup.layer_overrides.values()):
        write_json(out / RANKS_FILE, layer_ranks(model))
        files["ranks"] = RANKS_FILE
    meta = read_adapter_config(out / ADAPTER_FILE)
    return {"files": files, "adapters_sha256": meta["sha256"], "adapters_record_sha256": meta[RECORD_DIGEST]}


def export_merged_weights(cfg: ExperimentConfig, model, path) -> dict[str, Any]:
    """The adapted model as plain open_clip weights (merged), checked against a plain model's keys and shapes."""
    from .export import export_merged

    plain = build_clip(cfg.backbone, None, "cpu", seed=cfg.backbone_seed).model  # keys and shapes only
    exported = export_merged(model, path, reference=plain)
    logger.info("exported merged plain open_clip weights to %s", path)
    return {"exported_merged": str(exported)}


def export_peft_adapter(cfg: ExperimentConfig, model, directory) -> dict[str, Any]:
    """A peft LoRA adapter for transformers' CLIPModel; with weights no hub name stands for (tiny backbones, a
    file), the converted pretrained model is written beside it (``base_model/``) for ``PeftModel`` to load onto."""
    from .hf_clip import save_hf_clip
    from .peft_export import export_peft

    hub = "openai/clip-vit-base-patch16" if (cfg.backbone, cfg.pretrained) == ("ViT-B-16", "openai") else None
    exported = export_peft(model, directory, base_model_name_or_path=hub)
    if hub is None:
        save_hf_clip(model, Path(directory) / "base_model")
    logger.info("exported a peft adapter to %s", directory)
    return {"exported_peft": str(exported)}


def summary(cfg: ExperimentConfig, record: dict[str, Any], plan: list[Evaluation], out: Path) -> str:
    """One line: the run, then per evaluation zero-shot -> top-1, then the training figures."""
    scores = []
    for e in plan:
        if e.target:
            accuracy, zero_shot_score = record.get("eval_on", {}).get(e.name), None
        else:
            accuracy, zero_shot_score = record.get(f"{e.prefix}accuracy"), record.get(f"zero_shot_{e.prefix}accuracy")
        if accuracy is None:
            continue
        scores.append((f"{e.name}: " if len(plan) > 1 else "")
                      + (f"zero-shot {zero_shot_score:.2f}% -> " if zero_shot_score is not None else "")
                      + f"top-1 {accuracy:.2f}%")
    if "harmonic_mean" in record:
        scores.append(f"HM {record['harmonic_mean']:.2f}%")
    line = (f"{cfg.method} {dataset_name(cfg)} {cfg.shots}-shot seed {cfg.seed} ({cfg.backbone}): "
            + ("" if "iterations" in record else "eval only: ") + "; ".join(scores))
    if "iterations" in record:
        resumed = record["resumed_from"]
        line += (f" | {record['iterations'] - resumed} it" + (f" (resumed at {resumed})" if resumed else "")
                 + f" in {record['train_seconds']:.1f}s ({record['iterations_per_second']:.2f} it/s), "
                 f"{record['trainable_params']:,} trainable params")
    return f"{line} | {out}"
