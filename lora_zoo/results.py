"""Reading finished runs: every readable ``result.json`` under a folder, with the setting that defines it.

A run's *setting* is every option that can change its numbers, flat and spelled as
``--set`` spells it (``lr``, ``method_options.inner_rank`` — resolved from
``method_config``, so options left at their default show the default —,
``optimizer_options.lr_ratio``, ``optimizer``); the table's axes (method, run
name, dataset, shots, seed, backbone) and the bookkeeping keys (``config.py``
fields marked ``affects_result=False``: paths, devices, caches, logging) are not
part of it. ``scripts/make_table.py`` groups runs by setting; so can a notebook.

Runs of the four protocols (``PROTOCOLS``) are told apart by their records: a
few-shot ``result.json`` has ``"protocol": "fewshot"`` or no protocol key (runs
written before there were others), a base-to-new one ``"protocol": "base2new"``
(``load_base2new``), and a few-shot run evaluated on other datasets holds one
``eval_on/<target>.json`` per target (``load_transfers``: cross-dataset transfer
and domain generalisation). ``load_results`` reads few-shot runs only. Each run
keeps the display name its record gives its method (``runs.method_record``; None in
records written before runs recorded it): tables read no method registry. The cell
format of the tables (``cell_text``, ``average_text``) is here too.
A run that chose a setting on the test split says so (``"selected_on": "test"``: an authors' variant
that selects as their code does); tables mark it. A result whose accuracy is not a finite number (NaN from weights that diverged) is
never read as a run: ``load_results`` skips it with a warning naming the file, so no
table ranks or averages it.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import OPTION_GROUPS, bookkeeping_keys

ABSENT = "n/a"  # the value of an option a method does not have
AXES = ("method", "run_name", "dataset", "shots", "seed", "backbone")
PROTOCOLS = ("fewshot", "base2new", "cross_dataset", "domain")
MISSING = "—"  # a table cell without a run
#: the loop settings records written before methods had recipes (lora_zoo 0.3) lack: what those runs used
LOOP_BEFORE_RECIPES = {"recipe": "method", "epochs": None, "drop_last": False, "lr_schedule": "cosine",
                       "warmup_epochs": 0, "warmup_lr": 1e-5, "schedule_cycles": 1}


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
    display_name: str | None = None  # the method's, as the run recorded it (None: written before runs did)
    selected_on: str | None = None  # "test" when the run chose a setting on the test split (the authors' variants)
    derived: frozenset = frozenset()  # settings its method's recipe gave it for its shots and dataset (not split)

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
    config = {"augment_on": "cpu", **config}  # runs written before augment_on existed augmented on the CPU
    train = {**LOOP_BEFORE_RECIPES, **train}  # runs written before the recipes ran CLIP-LoRA's loop
    flat = {k: v for k, v in {**config, **train}.items()  # protocol: told apart by the run's folder
            if k not in (*AXES, *bookkeeping_keys(), "protocol", "train", "method_options", "optimizer_options")}
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


class NotFinite(ValueError):
    """A record whose accuracy is NaN or infinite: never a run a table ranks or averages."""


def finite_score(record: dict, key: str) -> float:
    """``record[key]`` as a float; ``NotFinite`` for NaN or infinity: every loader reads scores through here."""
    value = float(record[key])
    if not math.isfinite(value):
        raise NotFinite(f"its {key.replace('_', ' ')} is {record[key]} (not a finite number)")
    return value


def optional_float(value) -> float | None:
    return None if value is None else float(value)


def optional_text(value) -> str | None:
    return None if value is None else str(value)


def read_records(paths, parse) -> tuple[list, int]:
    """``parse(record)`` of each JSON file (None: not wanted), and how many could not be read (each warned about)."""
    out, unreadable = [], 0
    for path in paths:
        try:
            parsed = parse(json.loads(path.read_text()), path)
        except NotFinite as err:
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            unreadable += 1
            continue
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            print(f"warning: skipping unreadable {path}: {err}", file=sys.stderr)
            unreadable += 1
            continue
        if parsed is not None:
            out.append(parsed)
    return out, unreadable


def load_results(root: Path) -> tuple[list[Run], int]:
    """Every readable few-shot result.json under ``root``, and how many could not be read (each warned about).

    Runs of another protocol (a ``"protocol"`` other than ``"fewshot"``: base-to-new) are left out."""
    def parse(r, path):
        if r.get("protocol", "fewshot") != "fewshot":
            return None
        return Run(str(r["backbone"]), str(r["method"]), str(r["dataset"]), int(r["shots"]), int(r["seed"]),
                   finite_score(r, "accuracy"), (r.get("config") or {}).get("run_name"), setting_of(r),
                   optional_float(r.get("zero_shot_accuracy")), optional_text(r.get("display_name")),
                   optional_text(r.get("selected_on")), frozenset(r.get("derived_settings") or ()))
    return read_records(sorted(root.rglob("result.json")), parse)


def harmonic_mean(base: float, new: float) -> float:
    """``2·B·N / (B + N)``: the H of base-to-new tables (CoCoOp; Zhou et al., CVPR 2022); 0 when both are 0."""
    return 2 * base * new / (base + new) if base + new else 0.0


@dataclass(frozen=True)
class Base2NewRun:
    """A base-to-new run: trained on the base classes, scored on the base and on the new classes' test images,
    each over its own classes' prompts; the pretrained model's accuracies on both halves beside them."""

    backbone: str
    method: str
    run_name: str | None
    dataset: str
    shots: int
    seed: int
    base: float
    new: float
    zero_shot_base: float | None = None
    zero_shot_new: float | None = None
    display_name: str | None = None
    selected_on: str | None = None


def load_base2new(root: Path) -> tuple[list[Base2NewRun], int]:
    """Every readable result.json with ``"protocol": "base2new"`` under ``root``, and how many were unreadable."""
    def parse(r, path):
        if r.get("protocol") != "base2new":
            return None
        run_name = r.get("run_name", (r.get("config") or {}).get("run_name"))
        return Base2NewRun(str(r["backbone"]), str(r["method"]), run_name, str(r["dataset"]), int(r["shots"]),
                           int(r["seed"]), finite_score(r, "base_accuracy"), finite_score(r, "new_accuracy"),
                           optional_float(r.get("zero_shot_base_accuracy")),
                           optional_float(r.get("zero_shot_new_accuracy")), optional_text(r.get("display_name")),
                           optional_text(r.get("selected_on")))
    return read_records(sorted(root.rglob("result.json")), parse)


@dataclass(frozen=True)
class TransferRun:
    """A few-shot run's adapters scored on another dataset's whole test set (``eval_on/<target>.json``), with
    the run's own accuracy on its source dataset (its ``result.json``; None when that is unreadable)."""

    backbone: str
    method: str
    run_name: str | None
    source: str
    target: str
    shots: int
    seed: int
    accuracy: float
    zero_shot: float | None = None
    source_accuracy: float | None = None
    source_zero_shot: float | None = None
    display_name: str | None = None


def load_transfers(root: Path) -> tuple[list[TransferRun], int]:
    """Every readable ``eval_on/<target>.json`` under ``root``, and how many were unreadable."""
    def parse(r, path):
        try:
            source = json.loads((path.parent.parent / "result.json").read_text())
        except (OSError, ValueError):
            source = {}
        return TransferRun(str(r["backbone"]), str(r["method"]), r.get("run_name"), str(r["source_dataset"]),
                           str(r["target"]), int(r["shots"]), int(r["seed"]), finite_score(r, "accuracy"),
                           optional_float(r.get("zero_shot_accuracy")), optional_float(source.get("accuracy")),
                           optional_float(source.get("zero_shot_accuracy")), optional_text(r.get("display_name")))
    return read_records(sorted(root.rglob("eval_on/*.json")), parse)


def mean_std(values):
    """``(mean, sample std or None for one value, count)``, or None for no values."""
    values = list(values)
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def cell_text(stat, expected: int) -> str:
    """``"mean ± std"`` of ``mean_std``'s triple, ``" (n/N)"`` with fewer than ``expected`` seeds, "—" for none."""
    if stat is None:
        return MISSING
    mean, std, n = stat
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" ({n}/{expected})" if n < expected else "")


def average_text(per_dataset: list[dict], expected: int) -> str:
    """Per seed, the mean over the datasets present (seeds all of them have); mean ± std of those."""
    present = [p for p in per_dataset if p]
    common = set.intersection(*(set(p) for p in present)) if present else set()
    if not common:
        return MISSING
    text = cell_text(mean_std(statistics.fmean(p[s] for p in present) for s in sorted(common)), expected)
    return text + (f" [{len(present)}/{len(per_dataset)} datasets]" if len(present) < len(per_dataset) else "")
