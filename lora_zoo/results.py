"""Reading finished runs: every readable ``result.json`` under a folder, with the setting that defines it.

A run's *setting* is every option that can change its numbers, flat and spelled as
``--set`` spells it (``lr``, ``method_options.inner_rank`` — resolved from
``method_config``, so options left at their default show the default —,
``optimizer_options.lr_ratio``, ``optimizer``); the table's axes (method, run
name, dataset, shots, seed, backbone) and the bookkeeping keys (``config.py``
fields marked ``affects_result=False``: paths, devices, caches, logging) are not
part of it. ``scripts/make_table.py`` groups runs by setting; so can a notebook.
A result whose accuracy is not a finite number (NaN from weights that diverged) is
never read as a run: ``load_results`` skips it with a warning naming the file, so no
table ranks or averages it.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import bookkeeping_keys

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


def setting_of(result: dict) -> tuple:
    """The options that define a run, flat: config and train fields, ``method_options.*`` (resolved, with
    defaults, from ``method_config``), ``optimizer_options.*`` and the optimizer it trained with."""
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    train = config.get("train") or {}
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
    """Every readable result.json with a finite accuracy under ``root``, and how many were skipped because they
    could not be read or their accuracy is not finite (each warned about)."""
    runs, unreadable = [], 0
    for path in sorted(root.rglob("result.json")):
        try:
            r = json.loads(path.read_text())
            if not math.isfinite(float(r["accuracy"])):
                print(f"warning: skipping {path}: its accuracy is {r['accuracy']} (not a finite number)",
                      file=sys.stderr)
                unreadable += 1
                continue
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
