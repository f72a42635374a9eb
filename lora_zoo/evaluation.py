"""What a run is evaluated on, as data: an evaluation plan, its test loaders and the zero-shot cache.

An ``Evaluation`` is one test set scored over one list of class prompts, and where its
numbers are recorded. The protocols are plans the same pipeline stages run
(``experiment.py``), not branches of it:

- few-shot (``few_shot_plan``): the dataset's test split over all its classes, recorded in
  ``result.json`` as ``accuracy``, ``zero_shot_accuracy`` and ``test_images``;
- base-to-new (``base_to_new_plan``; CoOp's ``subsample_classes``): trained on the base half
  of the classes, scored on the base half's test images over the base prompts and on the
  new half's over the new prompts (``base_accuracy``, ``new_accuracy`` and their harmonic
  mean), each half relabelled 0..k-1;
- other datasets (``target_plan``, ``--eval_on``: cross-dataset transfer, domain
  generalisation): each target's whole test split over its own classes' prompts, recorded
  in ``eval_on/<target>.json`` inside the run folder.

Zero-shot accuracy (the pretrained model, same prompts, same test set) is computed once per
backbone, weights, prompts and test set, then read from a small JSON cache under
``output_dir/.cache/zero_shot``. Its key holds each test image's path, label and content
identity (``datasets.identity.content_key``: size and modification/change times), so a
changed image gives a new key, never a stale accuracy.

Both caches only save time: one that cannot be written (a read-only folder or filesystem) is
skipped, the run goes on without it, and the process says so once per folder (a warning).
A full disk is not skipped: it stops the run in one line, as every other write does.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .config import ExperimentConfig
from .errors import NonFiniteError
from .files import without_cache, write_json
from .kinds import scorer_of
from .models import weights_identity
from .scoring import as_classes, autocast

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Evaluation:
    """One test set scored over one set of class prompts, and where its numbers are recorded."""

    name: str                # "test", "base", "new", or a target dataset
    dataset: str             # the dataset the test set and class names come from
    test: Sequence[Any]      # datasets.Datum, labels 0..len(prompts)-1
    prompts: Sequence[str]   # one prompt per class, in label order
    prefix: str = ""         # result.json keys: f"{prefix}accuracy", f"zero_shot_{prefix}accuracy", ...
    target: bool = False     # recorded in eval_on/<dataset>.json (another dataset), not in result.json
    names: Sequence[str] = ()  # the class names, in label order (learned prompts are built from them)

    @classmethod
    def of(cls, name: str, ds, cfg: ExperimentConfig, **kwargs) -> "Evaluation":
        """The evaluation of ``ds``'s test split over its classes, prompted with the run's template setting."""
        return cls(name, kwargs.pop("dataset", cfg.dataset), ds.test, ds.prompts(cfg.template), names=ds.classnames,
                   **kwargs)


def few_shot_plan(cfg: ExperimentConfig, ds) -> list[Evaluation]:
    """The few-shot protocol: the dataset's whole test split over every class."""
    return [Evaluation.of("test", ds, cfg)]


def base_to_new_plan(cfg: ExperimentConfig, base, new) -> list[Evaluation]:
    """Base-to-new: the base half's test images over the base prompts, the new half's over the new prompts."""
    return [Evaluation.of("base", base, cfg, prefix="base_"), Evaluation.of("new", new, cfg, prefix="new_")]


def target_plan(cfg: ExperimentConfig, targets: Sequence[Any]) -> list[Evaluation]:
    """Other datasets' whole test splits, each over its own classes' prompts with the run's template setting."""
    return [Evaluation.of(ds.name, ds, cfg, dataset=ds.name, target=True) for ds in targets]


def test_loader(cfg: ExperimentConfig, data: Sequence[Any], transform, workers: int):
    """Batches of preprocessed test images: from the memory-mapped cache with ``test_cache_dir`` (unless that folder
    cannot be written), else decoded."""
    from datasets import build_data_loader
    from datasets.cache import PreprocessedImages

    if cfg.test_cache_dir is not None:
        try:
            return PreprocessedImages(data, transform, cfg.test_cache_dir, cfg.eval_batch_size)
        except OSError as err:
            without_cache(f"--test_cache_dir {cfg.test_cache_dir}", err)
    return build_data_loader(data, transform, batch_size=cfg.eval_batch_size, num_workers=workers)


def digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def zero_shot_key(cfg: ExperimentConfig, evaluation: Evaluation, device) -> dict[str, Any]:
    """What a zero-shot accuracy depends on: the weights, the prompts, the test images (their content too)."""
    from datasets.identity import content_key

    return {"backbone": cfg.backbone, "weights": weights_identity(cfg.backbone, cfg.pretrained),
            "backbone_seed": cfg.backbone_seed if cfg.pretrained is None else None, "dataset": evaluation.dataset,
            "prompts": digest(list(evaluation.prompts)), "test": content_key(evaluation.test),
            "device": device.type, "precision": cfg.train.precision}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, classes, device: torch.device, precision: str = "fp32") -> float:
    """Top-1 accuracy (%) of the model's classifier (``kinds.scorer_of``: CLIP's over the class prompts for weight
    adapters and the plain model, a learner's own) over ``loader``; ``classes`` a ``ClassSet`` (or token ids).

    Logits that are not all finite (NaN adapters, an overflow) raise ``NonFiniteError``: argmax over NaNs
    would pick class 0 and report its share as an accuracy. The host waits for the device once, at the end.
    """
    scorer, classes = scorer_of(model), as_classes(classes).to(device)
    was_training = model.training
    model.eval()
    correct, finite, total = torch.zeros((), dtype=torch.long, device=device), torch.ones((), dtype=torch.bool,
                                                                                          device=device), 0
    try:
        with autocast(device, precision):
            state = scorer.class_state(model, classes)
            for images, labels in loader:
                logits = scorer.logits(model, scorer.inputs(model, images.to(device, non_blocking=True)), state)
                finite &= logits.isfinite().all()
                correct += (logits.argmax(dim=-1) == labels.to(device, non_blocking=True)).sum()
                total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation loader is empty")
    if not bool(finite):
        raise NonFiniteError(f"the model's logits are not finite on {total} test images ({precision}); no "
                             "accuracy recorded (non-finite adapter tensors, or an overflow)")
    return 100.0 * int(correct) / total


def zero_shot_accuracy(cfg: ExperimentConfig, model, loader, evaluation: Evaluation, classes,
                       device) -> tuple[float, bool]:
    """``(accuracy, from_cache)``: evaluated once per backbone, weights, prompts and test set, then reused."""
    key = zero_shot_key(cfg, evaluation, device)  # before any image is read: a file changed meanwhile gets a new key
    path = Path(cfg.output_dir) / ".cache" / "zero_shot" / f"{digest(key)}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return float(cached["accuracy"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    accuracy = evaluate(model, loader, classes, device, cfg.train.precision)
    try:
        write_json(path, {"key": key, "accuracy": accuracy})
    except OSError as err:
        without_cache(f"the zero-shot cache {Path(cfg.output_dir) / '.cache'}", err)
    return accuracy, False
