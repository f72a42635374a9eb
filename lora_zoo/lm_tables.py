"""The commonsense task's table in the NoRA paper's Table 1 layout, from ``result.json`` files alone (no torch).

Columns: method, trainable parameters (and their share of the base model's), the eight tasks' accuracies in
LLM-Adapters' order (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA), their average, training time
and peak memory. A row is a method and run name (``--run_name r16`` tells LoRA r16 from r32) on one base model;
runs of several seeds are averaged (a cell: mean, with the seed count when more than one). An "untuned" row gives
the base model's own accuracies where a run recorded them (``--eval_untuned``). Runs scored on the first N test
records of each task (``--eval_limit``) say so in the title, and runs of different limits are never one table.

    python scripts/make_table.py outputs --task commonsense [--format md|latex|csv|all]
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from datasets.commonsense import TASK_TITLES, TASKS

from .results import MISSING, finite_score, read_records

COLUMNS = ["Method", "Params", *TASK_TITLES.values(), "Avg.", "Train time", "Memory"]


@dataclass(frozen=True)
class LmRun:
    base_model: str
    method: str
    label: str
    seed: int
    eval_limit: int | None
    tasks: dict
    accuracy: float
    trainable: int
    base_params: int | None
    seconds: float | None
    memory_mb: float | None
    memory_kind: str | None
    untuned: dict | None


def load_commonsense(root: Path) -> tuple[list[LmRun], int]:
    """Every readable commonsense ``result.json`` under ``root``, and how many could not be read."""
    def parse(r, path):
        if r.get("task") != "commonsense":
            return None
        label = str(r.get("display_name") or r["method"]) + (f" ({r['run_name']})" if r.get("run_name") else "")
        return LmRun(str(r["base_model"]), str(r["method"]), label, int(r["seed"]), r.get("eval_limit"),
                     {t: finite_score(r["tasks"], t) for t in r["tasks"]}, finite_score(r, "accuracy"),
                     int(r["trainable_params"]), r.get("base_params"), r.get("train_seconds"), r.get("peak_memory_mb"),
                     r.get("peak_memory_kind"), r.get("untuned_tasks"))
    return read_records(sorted(Path(root).rglob("result.json")), parse)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _cell(values: list, digits: int = 1) -> str:
    mean = _mean(values)
    if mean is None:
        return MISSING
    return f"{mean:.{digits}f}" + (f" (n={len(values)})" if len(values) > 1 else "")


def _params(runs: list[LmRun]) -> str:
    count = runs[0].trainable
    share = f" ({100 * count / runs[0].base_params:.3f}%)" if runs[0].base_params else ""
    return f"{count / 1e6:.3f}M{share}" if count >= 1e5 else f"{count:,}{share}"


def _memory(runs: list[LmRun]) -> str:
    mean = _mean([r.memory_mb for r in runs])
    if mean is None:
        return MISSING
    kind = {"cuda_allocated": "GPU", "cpu_maxrss": "RSS"}.get(runs[0].memory_kind or "", "")
    return f"{mean / 1024:.2f} GiB {kind}".strip() if mean >= 1024 else f"{mean:.0f} MiB {kind}".strip()


def _time(runs: list[LmRun]) -> str:
    mean = _mean([r.seconds for r in runs])
    if mean is None:
        return MISSING
    return f"{mean / 3600:.2f} h" if mean >= 3600 else f"{mean / 60:.1f} min" if mean >= 60 else f"{mean:.0f} s"


def table_rows(runs: list[LmRun]) -> list[list[str]]:
    """The untuned row (where recorded), then one row per method and run name, in the order first found sorted by
    label; the task cells in ``TASKS`` order."""
    groups: dict[str, list[LmRun]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.label):
        groups[run.label].append(run)
    rows = []
    untuned = [r.untuned for r in runs if r.untuned]
    if untuned:
        cells = [_cell([u.get(t) for u in untuned if t in u]) for t in TASKS]
        rows.append(["untuned", "0", *cells, _cell([_mean(u.values()) for u in untuned]), MISSING, MISSING])
    for label, members in groups.items():
        cells = [_cell([r.tasks.get(t) for r in members if t in r.tasks]) for t in TASKS]
        rows.append([label, _params(members), *cells, _cell([r.accuracy for r in members]), _time(members),
                     _memory(members)])
    return rows


def tables(runs: list[LmRun]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, head, rows)`` per base model and evaluation limit."""
    out = []
    for base_model, limit in sorted({(r.base_model, r.eval_limit) for r in runs}, key=lambda k: (k[0], k[1] or 0)):
        mine = [r for r in runs if r.base_model == base_model and r.eval_limit == limit]
        scope = f"the first {limit} test records of each task" if limit else "the full test sets"
        title = (f"Commonsense reasoning (LLM-Adapters' protocol, the NoRA paper's Table 1 layout): {base_model}, "
                 f"accuracy (%) on {scope}; seeds {sorted({r.seed for r in mine})}; {MISSING} = not recorded")
        out.append((title, COLUMNS, table_rows(mine)))
    return out
