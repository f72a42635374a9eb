"""A paper's table as data, and its layout: the NoRA paper's Table 2 (Li et al., ICCV 2025), row by row, ours
beside the reported numbers.

``TABLE2`` lists the paper's rows in its order, each the name it has in the paper (and in
``reported/nora_table2.csv``) and the method of ours that runs it — a registered method or preset, with
method options where the row needs them (then its runs have their own ``run_name``) — then the rows of ours
the paper does not have (AIRA, CLIP-SVD, 2SFS, LP++). Some rows name methods other work adds; a checkout
runs the ones it registers. ``scripts/sweep.sh --table 2`` plans the runs (its datasets × shots × seeds) and
``scripts/make_table.py --paper table2`` prints the table (``paper_tables``): one row per entry, each cell ours
(mean ± sample std over the seeds, ``(n/N)`` with fewer) and the paper's value. A row some of whose runs chose
a setting on the test split (their result records ``"selected_on": "test"``) is marked. Read from the JSON
records alone, as every table (``tables.py``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .results import MISSING, average_text, cell_text, mean_std
from .tables import dataset_label, known_average, number_text, single

TEST_SELECTED = "†"


@dataclass(frozen=True)
class PaperRow:
    """One row: its ``name`` (the paper's, for a row of the paper) and our ``method`` (registered name or preset)."""

    name: str
    method: str
    reported: bool = True                  # a row of the paper (False: of ours only)
    options: tuple[tuple[str, Any], ...] = ()   # method options of its runs, ((name, value), ...)
    run_name: Optional[str] = None         # its runs' run name: needed with options (their own folder)

    def __post_init__(self):
        if self.options and not self.run_name:
            raise ValueError(f"row {self.name}: a row with options needs a run_name")


@dataclass(frozen=True)
class PaperTable:
    """A paper's table: its rows in order and the runs each needs."""

    name: str
    title: str
    rows: tuple[PaperRow, ...]
    datasets: tuple[str, ...]     # in the paper's column order
    shots: tuple[int, ...]
    seeds: tuple[int, ...] = (1, 2, 3)
    backbone: str = "ViT-B-16"
    reported: str = "reported/nora_table2.csv"  # relative to the repository


TABLE2 = PaperTable(
    "table2", "the NoRA paper's Table 2 (Li et al., ICCV 2025)",
    rows=(PaperRow("CoOp (4)", "coop4"), PaperRow("CoOp (16)", "coop16"), PaperRow("CoCoOp", "cocoop"),
          PaperRow("TIP-Adapter-F", "tip_adapter"), PaperRow("CLIP-Adapter", "clip_adapter"),
          PaperRow("PLOT++", "plot"), PaperRow("KgCoOp", "kgcoop"), PaperRow("TaskRes", "taskres"),
          PaperRow("MaPLe", "maple"), PaperRow("ProGrad", "prograd"), PaperRow("CLIP-LoRA", "lora"),
          PaperRow("LoRA+", "loraplus"), PaperRow("AdaLoRA", "adalora"), PaperRow("DyLoRA", "dylora"),
          PaperRow("LoRA-FA", "lorafa"), PaperRow("VeRA", "vera"), PaperRow("NoRA", "nora"),
          PaperRow("AIRA", "aira", reported=False), PaperRow("CLIP-SVD", "clip_svd", reported=False),
          PaperRow("2SFS", "twostage", reported=False), PaperRow("LP++", "lp_pp", reported=False)),
    datasets=("food101", "oxford_pets", "dtd"), shots=(4, 16))
PAPER_TABLES = {table.name: table for table in (TABLE2,)}


def paper_table(name: str) -> PaperTable:
    """The table ``name`` (``table2``); a one-line error naming the known ones otherwise."""
    try:
        return PAPER_TABLES[name]
    except KeyError:
        raise ValueError(f"no paper table {name!r}; expected one of {', '.join(PAPER_TABLES)}") from None


def reported_values(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    """``{(paper row, shots): {column: value}}`` of a reported-results CSV (``#`` lines are comments)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {(row["method"], int(row["shots"])): row for row in csv.DictReader(lines)}


@dataclass
class RowRuns:
    """One row's runs of one backbone: ``cells[(shots, dataset)] = {seed: accuracy}``, and whether any was
    selected on the test split."""

    cells: dict = field(default_factory=dict)
    test_selected: bool = False


def row_runs(table: PaperTable, row: PaperRow, runs) -> RowRuns:
    found = RowRuns()
    for run in runs:
        if (run.method, run.run_name) != (row.method, row.run_name) or run.seed not in table.seeds:
            continue
        if run.shots in table.shots and run.dataset in table.datasets:
            found.cells.setdefault((run.shots, run.dataset), {}).setdefault(run.seed, run.accuracy)
            found.test_selected |= run.selected_on == "test"
    return found


def row_cells(table: PaperTable, row: PaperRow, found: RowRuns, reported: dict) -> list[str]:
    """Per shot count, each dataset's cell and the average's: ours, then the paper's value in parentheses."""
    cells, expected = [], len(table.seeds)
    for shots in table.shots:
        per_dataset = [found.cells.get((shots, d), {}) for d in table.datasets]
        ours = [cell_text(mean_std(p.values()), expected) for p in per_dataset]
        ours.append(average_text(per_dataset, expected))
        paper = reported.get((row.name, shots), {}) if row.reported else None
        for text, column in zip(ours, [*table.datasets, "average"]):
            cells.append(text if paper is None else f"{text} (paper {paper.get(column) or MISSING})")
    return cells


def zero_shot_cells(table: PaperTable, runs) -> Optional[list[str]]:
    """The pretrained model's accuracies the runs recorded (``varies`` where prompts differ), None without any."""
    found = [single(r.zero_shot for r in runs if r.dataset == d and r.seed in table.seeds) for d in table.datasets]
    if all(value is None for value in found):
        return None
    return [*map(number_text, found), known_average(found)] * len(table.shots)


def paper_tables(table: PaperTable, runs, reported_path: Path, backbone: Optional[str] = None):
    """``(title, column groups, header, rows)`` per backbone with results (``backbone``: that one only)."""
    reported = reported_values(reported_path) if Path(reported_path).is_file() else {}
    backbones = [backbone] if backbone else sorted({r.backbone for r in runs}, key=lambda b: (b != table.backbone, b))
    out = []
    for name in backbones or [table.backbone]:
        mine = [r for r in runs if r.backbone == name]
        rows, marked = [], False
        zero_shot = zero_shot_cells(table, mine)
        if zero_shot:
            rows.append(["Zero-shot (no training)", *zero_shot])
        for row in table.rows:
            found = row_runs(table, row, mine)
            marked |= found.test_selected
            label = f"{row.name} (ours, {row.method}"
            label += (f", {row.run_name})" if row.run_name else ")") + (f" {TEST_SELECTED}" if found.test_selected
                                                                        else "")
            rows.append([label, *row_cells(table, row, found, reported)])
        out.append((table_title(table, name, reported_path, bool(reported), marked), [f"{k}-shot" for k in table.shots],
                    ["Method", *map(dataset_label, table.datasets), "Average"], rows))
    return out


def table_title(table: PaperTable, backbone: str, reported_path: Path, reported: bool, marked: bool) -> str:
    seeds = list(table.seeds)
    notes = [f"Top-1 accuracy (%), {backbone}: {table.title}, row by row; ours: mean ± sample std over seeds {seeds} "
             f"((n/{len(seeds)}) = seeds found, {MISSING} = no run), the paper's value in parentheses"
             + (f" ({Path(reported_path).name}, {table.backbone})" if reported else f" (none: {reported_path} not found)"),
             "Average: for each seed, the mean over the datasets the row has; [k/D datasets] = only k of the D"]
    if backbone != table.backbone:
        notes.append(f"the paper's values are {table.backbone}; these results are {backbone}: not comparable")
    if marked:
        notes.append(f"{TEST_SELECTED} = some of the row's runs chose a setting on the test split (selected_on: "
                     "test): optimistic, not the protocol's result")
    return "\n".join(notes)
