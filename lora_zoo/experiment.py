"""One few-shot CLIP adaptation experiment, from a typed config to ``result.json``.

Implements the protocol of ``../shared/METHODS.md`` ("Experiment protocol"; CLIP-LoRA,
Zanella & Ben Ayed, CVPRW 2024; NoRA and AIRA, Li et al., ICCV 2025):
open_clip backbone → few-shot split (``datasets``) → zero-shot accuracy with the
same prompts → calibration statistics when the method needs them (vision: the
few-shot train images with the test transform; text: the class prompts; only
adapted encoders) → ``apply_adapters`` → the one training loop (``train.py``) →
merge → top-1 on the full test split → outputs, atomically, under
``output_dir/<backbone>/<dataset>/<shots>shots/seed<seed>/<method>/``:
``adapters.safetensors`` + ``adapters.json``, ``ranks.json`` (when the method
planned per-layer ranks, e.g. AIRA), ``train.log`` and, last, ``result.json``:
its presence means the run finished.

``ExperimentConfig`` is the only configuration object; ``load_config`` maps YAML
files and dotted overrides onto it. No command-line parsing happens here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
import yaml

from .checkpoint import atomic_write, load_adapters, save_adapters
from .export import export_merged
from .inject import adapter_modules, apply_adapters, build_config, count_trainable, layer_ranks, merge_adapters
from .models import TINY_CONFIGS, build_clip, list_backbones
from .targets import check_targets
from .train import evaluate, prepare_device, train_adapters

logger = logging.getLogger(__name__)
RESULT_FILE, ADAPTER_FILE, RANKS_FILE, EVAL_FILE = "result.json", "adapters.safetensors", "ranks.json", "eval.json"


def _tuple(name, value, item=str):
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return tuple(item(v) for v in value)


def _number(name, value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = kind(value) if kind is float or not isinstance(value, str) else int(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is int and number != value and not isinstance(value, str):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return number


@dataclass
class ExperimentConfig:
    """Everything that defines one run (the protocol's defaults; the method's YAML sets the rest)."""

    method: str = "lora"
    dataset: str = "dtd"
    root_path: str = "data"
    shots: int = 16
    seed: int = 1
    backbone: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    method_options: dict = field(default_factory=dict)
    encoders: tuple = ("vision", "text")
    targets: tuple = ("q", "k", "v")
    layers: Optional[tuple] = None            # block indices, None = every block
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: tuple = (0.9, 0.999)
    n_iters: int = 500                        # iterations per shot: total = n_iters × shots
    batch_size: int = 32
    eta_min: float = 1e-6
    num_workers: Optional[int] = None         # None: min(8, CPUs)
    eval_batch_size: int = 128
    template: Optional[str] = None            # None: the dataset's ("a photo of a {}.")
    device: str = "auto"                      # auto | cpu | cuda | cuda:N
    amp: bool = True                          # autocast + GradScaler, on CUDA only
    output_dir: str = "outputs"
    backbone_seed: int = 0                    # init of the random tiny-* backbones, same for every seed

    def __post_init__(self):
        from datasets.registry import get_spec as dataset_spec  # the repository's few-shot datasets package

        for name in ("shots", "seed", "n_iters", "batch_size", "eval_batch_size", "backbone_seed"):
            setattr(self, name, _number(name, getattr(self, name), int))
        for name in ("lr", "weight_decay", "eta_min"):
            setattr(self, name, _number(name, getattr(self, name), float))
        for name in ("shots", "n_iters", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.eta_min < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, eta_min >= 0 (got {self.lr}, {self.weight_decay}, {self.eta_min})")
        if self.num_workers is not None:
            self.num_workers = _number("num_workers", self.num_workers, int)
        self.betas = _tuple("betas", self.betas, float)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        self.encoders, self.targets = check_targets(_tuple("encoders", self.encoders), _tuple("targets", self.targets))
        if self.layers in ("all", "", None):
            self.layers = None
        else:
            self.layers = _tuple("layers", self.layers, int)
        if self.pretrained in ("", "none", "None"):
            self.pretrained = None
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a mapping, got {self.method_options!r}")
        if self.backbone not in list_backbones():
            raise ValueError(f"unknown backbone {self.backbone!r}; expected an open_clip model name "
                             "(open_clip.list_models(), e.g. ViT-B-16) or tiny-vit / tiny-demo")
        dataset_spec(self.dataset)                                # unknown dataset → one line listing names
        build_config(self.method, **self.method_options)          # unknown method / bad option → one line
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def total_iterations(self) -> int:
        return self.n_iters * self.shots

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _read_yaml(path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping of keys to values")
    return data


def _merge(values: dict, new: Mapping[str, Any], source: str) -> None:
    known = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for key, value in new.items():
        head, _, rest = str(key).partition(".")
        if head not in known or (rest and head != "method_options"):
            raise ValueError(f"unknown config key {key!r} ({source}); valid keys: {', '.join(known)}, "
                             "method_options.<option>")
        if head == "method_options":
            options = values.setdefault("method_options", {})
            if rest:
                options[rest] = value
            elif isinstance(value, dict):
                options.update(value)
            else:
                raise ValueError(f"method_options must be a mapping ({source}), got {value!r}")
        else:
            values[head] = value


def load_config(yaml_paths: Iterable = (), overrides: Optional[Mapping[str, Any]] = None) -> ExperimentConfig:
    """Defaults < each YAML file in order < ``overrides`` (``{"lr": 1e-3, "method_options.rank": 4}``)."""
    values: dict = {}
    for path in yaml_paths:
        _merge(values, _read_yaml(path), str(path))
    _merge(values, dict(overrides or {}), "override")
    return ExperimentConfig(**values)


def run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/<backbone>/<dataset>/<shots>shots/seed<seed>/<method>`` (scripts/sweep.sh uses the same)."""
    return (Path(cfg.output_dir) / cfg.backbone.replace("/", "-") / cfg.dataset / f"{cfg.shots}shots"
            / f"seed{cfg.seed}" / cfg.method)


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


def environment() -> dict[str, Any]:
    """Package versions and the git commit of this checkout (read-only git calls)."""
    import open_clip
    import torchvision

    from . import __version__
    info = {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
                         "numpy": np.__version__, "lora_zoo": __version__},
            "git_commit": None, "git_dirty": None, "host": platform.node()}
    repo, env = Path(__file__).resolve().parents[1], dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            info["git_dirty"] = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _peak_memory_mb(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20, "peak_memory_kind": "cuda_allocated"}
    import resource
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_maxrss"}


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


class _RunLog:
    """Attach a log file in the run folder to the ``lora_zoo`` and ``datasets`` loggers for one run."""

    def __init__(self, path: Path):
        self.handler = logging.FileHandler(path, mode="w")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.loggers = [logging.getLogger("lora_zoo"), logging.getLogger("datasets")]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self.handler)
            if lg.level == logging.NOTSET or lg.level > logging.DEBUG:
                lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self.handler)
            lg.setLevel(level)
        self.handler.close()


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
            raise ValueError(f"--eval_only: no adapters at {adapters_path}; train this run first")
    elif (out / RESULT_FILE).exists() and not overwrite:
        raise ValueError(f"run already finished: {out / RESULT_FILE} exists (use --overwrite to train it again)")
    _check_writable(out)
    device = resolve_device(cfg.device)
    prepare_device(device)
    with _RunLog(out / ("eval.log" if eval_only else "train.log")):
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
        if eval_only:
            meta = load_adapters(model, adapters_path)
            if meta["method"] != cfg.method:
                raise ValueError(f"{adapters_path} holds {meta['method']} adapters, not {cfg.method}")
        else:
            result["zero_shot_accuracy"] = evaluate(model, test_loader, class_tokens, device, cfg.amp)
            logger.info("zero-shot top-1 %.2f%% on %d test images", result["zero_shot_accuracy"], len(ds.test))
            method_config = build_config(cfg.method, **cfg.method_options)
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
            result["trainable_params"] = count_trainable(model)
            logger.info("%s adapters on %d layers, %d trainable parameters", cfg.method,
                        len(adapter_modules(model)), result["trainable_params"])
            train_loader = build_data_loader(ds.train_x, build_train_transform(model), batch_size=cfg.batch_size,
                                             shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed)
            trained = train_adapters(model, train_loader, class_tokens, total_iterations=cfg.total_iterations,
                                     lr=cfg.lr, device=device, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                     eta_min=cfg.eta_min, text_adapted="text" in cfg.encoders, amp=cfg.amp,
                                     progress=progress)
            result.update(iterations=trained.iterations, train_seconds=trained.seconds,
                          iterations_per_second=trained.iterations_per_second, final_loss=trained.final_loss,
                          loss_history=trained.loss_history, hooks_summary=trained.hooks_summary,
                          method_config=method_config.to_dict())
        mergeable = all(a.mergeable for a in adapter_modules(model).values())
        if mergeable:
            merge_adapters(model)
        result["merged"] = mergeable
        result["accuracy"] = evaluate(model, test_loader, class_tokens, device, cfg.amp)
        result["test_images"] = len(ds.test)
        subset = "\n".join(f"{Path(d.impath).relative_to(ds.dataset_dir)}|{d.label}" for d in ds.train_x)
        result["train_subset_sha1"] = hashlib.sha1(subset.encode()).hexdigest()
        result["train_images"] = len(ds.train_x)
        if not eval_only:
            save_adapters(model, adapters_path)
            result["files"] = {"adapters": ADAPTER_FILE, "log": "train.log"}
            if any("rank" in o for o in model.lora_zoo_setup.layer_overrides.values()):  # a planned allocation
                _write_json(out / RANKS_FILE, layer_ranks(model))
                result["files"]["ranks"] = RANKS_FILE
        if export_path is not None:
            plain = build_clip(cfg.backbone, None, "cpu", seed=cfg.backbone_seed).model  # keys and shapes only
            result["exported_merged"] = str(export_merged(model, export_path, reference=plain))
            logger.info("exported merged plain open_clip weights to %s", export_path)
        result.update(_peak_memory_mb(device), wall_seconds=time.perf_counter() - started,
                      config=cfg.to_dict(), **environment())
        zero_shot = result.get("zero_shot_accuracy")
        result["summary"] = (f"{cfg.method} {cfg.dataset} {cfg.shots}-shot seed {cfg.seed} ({cfg.backbone}): "
                             + (f"zero-shot {zero_shot:.2f}% -> " if zero_shot is not None else "eval only: ")
                             + f"top-1 {result['accuracy']:.2f}%"
                             + (f" | {result['iterations']} it in {result['train_seconds']:.1f}s "
                                f"({result['iterations_per_second']:.2f} it/s), {result['trainable_params']:,} "
                                "trainable params" if not eval_only else "") + f" | {out}")
        _write_json(out / (EVAL_FILE if eval_only else RESULT_FILE), result)  # last: its presence = finished
        logger.info(result["summary"])
    return result
