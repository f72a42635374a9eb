"""What a run is evaluated on, as data: an evaluation plan, its test loaders and the zero-shot cache.

An ``Evaluation`` is one test set scored over one list of class prompts, and the keys its
numbers are recorded under in ``result.json``. The few-shot protocol's plan is one
evaluation (the dataset's test split over all its classes, recorded as ``accuracy``,
``zero_shot_accuracy`` and ``test_images``); other protocols are other plans run by the
same pipeline stages (``experiment.py``), not other branches of it.

Zero-shot accuracy (the pretrained model, same prompts, same test set) is computed once per
backbone, weights, prompts and test set, then read from a small JSON cache under
``output_dir/.cache/zero_shot``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import ExperimentConfig
from .files import write_json
from .models import weights_file


@dataclass(frozen=True)
class Evaluation:
    """One test set scored over one set of class prompts; its numbers go to ``<prefix>accuracy`` etc."""

    name: str                # "test" in the few-shot protocol
    dataset: str             # the dataset the test set and class names come from
    test: Sequence[Any]      # datasets.Datum, labels 0..len(prompts)-1
    prompts: Sequence[str]   # one prompt per class, in label order
    prefix: str = ""         # result keys: f"{prefix}accuracy", f"zero_shot_{prefix}accuracy", f"{prefix}test_images"


def few_shot_plan(cfg: ExperimentConfig, ds) -> list[Evaluation]:
    """The few-shot protocol: the dataset's whole test split over every class."""
    return [Evaluation("test", cfg.dataset, ds.test, ds.prompts(cfg.template))]


def test_loader(cfg: ExperimentConfig, data: Sequence[Any], transform, workers: int):
    """Batches of preprocessed test images: from the memory-mapped cache with ``test_cache_dir``, else decoded."""
    from datasets import build_data_loader
    from datasets.cache import PreprocessedImages

    if cfg.test_cache_dir is not None:
        return PreprocessedImages(data, transform, cfg.test_cache_dir, cfg.eval_batch_size)
    return build_data_loader(data, transform, batch_size=cfg.eval_batch_size, num_workers=workers)


def digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _weights_identity(backbone: str, pretrained: Optional[str]) -> Any:
    path = weights_file(backbone, pretrained)
    if path is not None:
        return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
    return pretrained


def zero_shot_accuracy(cfg: ExperimentConfig, model, loader, evaluation: Evaluation, class_tokens,
                       device) -> tuple[float, bool]:
    """``(accuracy, from_cache)``: evaluated once per backbone, weights, prompts and test split, then reused."""
    from .train import evaluate

    key = {"backbone": cfg.backbone, "weights": _weights_identity(cfg.backbone, cfg.pretrained),
           "backbone_seed": cfg.backbone_seed if cfg.pretrained is None else None, "dataset": evaluation.dataset,
           "prompts": digest(list(evaluation.prompts)), "test": digest([(d.impath, d.label) for d in evaluation.test]),
           "device": device.type, "precision": cfg.train.precision}
    path = Path(cfg.output_dir) / ".cache" / "zero_shot" / f"{digest(key)}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return float(cached["accuracy"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    accuracy = evaluate(model, loader, class_tokens, device, cfg.train.precision)
    write_json(path, {"key": key, "accuracy": accuracy})
    return accuracy, False
