"""Reading finished runs: every readable ``result.json`` under a folder, with the setting that defines it.

A run's *setting* is every option that can change its numbers, flat and spelled as
``--set`` spells it (``lr``, ``method_options.inner_rank`` — resolved from
``method_config``, so options left at their default show the default —,
``optimizer_options.lr_ratio``, ``optimizer``); the table's axes (method, run
name, dataset, shots, seed, backbone) and the bookkeeping keys (``config.py``
fields marked ``affects_result=False``: paths, devices, caches, logging) are not
part of it. ``scripts/make_table.py`` groups runs by setting; so can a notebook.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import OPTION_GROUPS, bookkeeping_keys

ABSENT = "n/a"  # the value of an option a method does not have
AXES = ("method", "run_name", "dataset", "shots", "seed", "backbone")


@dataclass(frozen=True)
class Run:
    """One finished run: where it sits in the table and its setting (``((key, value), ...)``, sorted)."""

    backbone: str
    method: str
    dataset: str
    shots: int
    seed: int
    accuracy: float
    run_name: str | None
    setting: tuple
    zero_shot: float | None = None  # the base model's accuracy on the same test split and prompts

    def value(self, key: str):
        return getattr(self, key) if key in AXES else dict(self.setting).get(key, ABSENT)


def frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    return value


def short_key(key: str) -> str:
    """A key as run names and table labels spell it: ``method_options.inner_rank`` → ``inner_rank``."""
    group, _, name = key.partition(".")
    return name if group in OPTION_GROUPS and name else key


def value_text(value) -> str:
    """A value as YAML writes it (``true``, ``null``, ``1e-3``); lists joined with ``+``."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return "+".join(map(value_text, value)) if isinstance(value, (list, tuple)) else str(value)


def run_name_of(pairs) -> str | None:
    """The run name of a grid point ``[(key, value), ...]``: ``lr=0.001_inner_rank=8`` (filesystem-safe), None
    for no pairs."""
    if not pairs:
        return None
    return "_".join(f"{short_key(key)}={re.sub(r'[^A-Za-z0-9._=,+-]', '-', value_text(value))}" for key, value in pairs)


def setting_of(result: dict) -> tuple:
    """The options that define a run, flat: config and train fields, ``method_options.*`` (resolved, with
    defaults, from ``method_config``), ``optimizer_options.*`` and the optimizer it trained with."""
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    train = dict(config.get("train") or {})
    if "amp" in train and "precision" not in train:  # lora_zoo 0.2 records: amp meant fp16 autocast on CUDA only
        train["precision"] = "fp16" if train.pop("amp") and str(result.get("device", "")).startswith("cuda") else "fp32"
    flat = {k: v for k, v in {**config, **train}.items()
            if k not in (*AXES, *bookkeeping_keys(), "train", "method_options", "optimizer_options")}
    flat.update({f"optimizer_options.{k}": v for k, v in (train.get("optimizer_options") or {}).items()})
    options = {**(config.get("method_options") or {}), **(result.get("method_config") or {})}
    flat.update({f"method_options.{k}": v for k, v in options.items()})
    if result.get("optimizer"):
        flat["optimizer"] = result["optimizer"]
    return tuple(sorted((k, frozen(v)) for k, v in flat.items()))


def first_difference(theirs: tuple, ours: tuple) -> str | None:
    """``"key: X there, Y now"`` for the first option two settings give different values, None if they agree."""
    a, b = dict(theirs), dict(ours)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, "unset") != b.get(k, "unset"))
    return None if not changed else f"{changed[0]}: {a.get(changed[0], 'unset')} there, {b.get(changed[0], 'unset')} now"


def load_results(root: Path) -> tuple[list[Run], int]:
    """Every readable result.json under ``root``, and how many could not be read (each warned about)."""
    runs, unreadable = [], 0
    for path in sorted(root.rglob("result.json")):
        try:
            r = json.loads(path.read_text())
            runs.append(Run(str(r["backbone"]), str(r["method"]), str(r["dataset"]), int(r["shots"]), int(r["seed"]),
                            float(r["accuracy"]), (r.get("config") or {}).get("run_name"), setting_of(r),
                            None if r.get("zero_shot_accuracy") is None else float(r["zero_shot_accuracy"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            print(f"warning: skipping unreadable {path}: {err}", file=sys.stderr)
            unreadable += 1
    return runs, unreadable


def mean_std(values):
    """``(mean, sample std or None for one value, count)``, or None for no values."""
    values = list(values)
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)
