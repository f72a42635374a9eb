"""Run folders: where a run writes, whether it finished, and with which settings it was trained.

``output_dir/<backbone>/<dataset>/<shots>shots/seed<seed>/<method>[-<run_name>]`` holds one
run; a readable ``result.json`` (written last, atomically) means it finished. The sweep
plans with these functions and the pipeline (``experiment.py``) writes what they read;
reading a folder imports neither torch nor open_clip (comparing a run's settings with a
config resolves the method's options, which loads the methods). A run records what the
tables show of its method (``method_record``), so tables are made from JSON alone.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .config import ExperimentConfig
from .errors import RunFinishedError
from .results import first_difference, setting_of

RESULT_FILE, ADAPTER_FILE, RANKS_FILE, EVAL_FILE = "result.json", "adapters.safetensors", "ranks.json", "eval.json"
STATE_FILE, EVAL_ON_DIR = "checkpoint.pt", "eval_on"
#: config keys that define the adapted model: an evaluation of a saved run must not change them
MODEL_KEYS = ("pretrained", "backbone_seed", "encoders", "targets", "layers")
#: config keys an evaluation may set (how it evaluates, not what)
EVAL_KEYS = ("device", "eval_batch_size", "num_workers", "template", "test_cache_dir", "threads")

__all__ = ["ADAPTER_FILE", "EVAL_FILE", "EVAL_ON_DIR", "RANKS_FILE", "RESULT_FILE", "STATE_FILE", "RunFinishedError",
           "dataset_name", "is_finished", "method_fields", "method_record", "read_result", "recorded_options", "run_dir", "run_setting",
           "saved_config", "target_file"]


def dataset_name(cfg: ExperimentConfig) -> str:
    """The dataset as results name it: the registered name; for ``imagefolder``, where the folder is the dataset,
    its name and a digest of its full resolved path (``imagefolder-birds-1a2b3c4d``): two folders named ``birds``
    never share a run."""
    if cfg.dataset != "imagefolder":
        return cfg.dataset
    folder = Path(cfg.root_path).resolve()
    return f"imagefolder-{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"


def run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/<backbone>/<dataset>[/base2new]/<shots>shots/seed<seed>/<method>[-<run_name>]`` (the sweep uses
    it too); ``<dataset>`` is ``dataset_name(cfg)``; a base-to-new run never shares a few-shot run's folder."""
    leaf = cfg.method if cfg.run_name is None else f"{cfg.method}-{cfg.run_name}"
    protocol = () if cfg.protocol == "fewshot" else (cfg.protocol,)
    return Path(cfg.output_dir, cfg.backbone.replace("/", "-"), dataset_name(cfg), *protocol, f"{cfg.shots}shots",
                f"seed{cfg.seed}", leaf)


def target_file(out: Path, target: str) -> Path:
    """Where a run's evaluation on another dataset (``--eval_on``) is recorded."""
    return Path(out) / EVAL_ON_DIR / f"{target}.json"


def read_result(folder: Path) -> dict[str, Any] | None:
    """The run's ``result.json`` if it is complete (valid JSON with an accuracy), else None."""
    try:
        result = json.loads((Path(folder) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("accuracy"), (int, float)) else None


def method_record(cfg: ExperimentConfig) -> dict[str, str]:
    """What ``result.json`` and ``eval_on/<target>.json`` record of the run's method for the tables to show: its
    display name, citation and kind (``lora_zoo.tables`` reads them; it looks nothing up in the registry)."""
    return method_fields(cfg.method_spec)


def method_fields(spec) -> dict[str, str]:
    """A ``registry.MethodSpec``'s display name, citation and kind, as records hold them."""
    return {"display_name": spec.display_name, "citation": spec.citation, "kind": spec.kind}


def recorded_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """The optimizer and the resolved method options (layer and schedule) as ``result.json`` records them."""
    return {"optimizer": cfg.optimizer, "method_config": cfg.resolved_method_options}


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


def saved_config(out: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """The config of the finished run an evaluation reloads, with ``cfg``'s evaluation settings (``EVAL_KEYS``);
    a one-line error if the run is missing or ``cfg`` would change the model it evaluates."""
    saved = read_result(out)
    if saved is None or not (out / ADAPTER_FILE).is_file():
        raise ValueError(f"no finished run to evaluate at {out} (train it first)")
    requested = cfg.to_dict()
    for key in MODEL_KEYS:
        if requested[key] != saved["config"].get(key):
            raise ValueError(f"the run at {out} was trained with {key}={saved['config'].get(key)!r}; evaluating "
                             f"it with {key}={requested[key]!r} would evaluate another model")
    layer_config = cfg.method_config.to_dict()
    for key in cfg.method_options:
        if key in layer_config and layer_config[key] != saved["method_config"].get(key):
            raise ValueError(f"the run at {out} was trained with method_options.{key}="
                             f"{saved['method_config'].get(key)!r}, not {layer_config[key]!r}")
    return {**saved["config"], **{k: requested[k] for k in EVAL_KEYS}}
