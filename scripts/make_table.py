"""Tabulate a results folder: the NoRA paper's Table 2 layout (Li et al., ICCV 2025), or any sweep's grid.

Rows are settings: method, then every option whose value differs between that method's runs (from each
result.json's resolved config, spelled as ``--set`` spells it), or the run name; runs of different settings
are never pooled. ``--rows KEY`` leads and orders the rows by an option, ``--cols KEY`` makes its values the
columns (one table per dataset), ``--best_over KEY`` adds the best KEY per cell, chosen on the test split
(optimistic, and labelled so). A cell is mean ± sample std over the seeds found, ``(n/N)`` with fewer seeds
than ``--seeds``, "—" with no run. Average: per seed, the mean over the datasets the row has. A "Zero-shot"
row gives the base model's recorded accuracy ("varies" where a column mixes prompts or weights; "random init"
where the runs started from random weights, ``pretrained: null``). The paper's
rows (``reported/nora_table2.csv``) appear beside ViT-B-16 results only; one table per backbone. Markdown,
LaTeX, CSV; ``--plot_dir`` adds accuracy-vs-shots PNGs (``scripts/plot_shots.py``, matplotlib). Runs of the
other protocols never enter it: ``--protocol base2new|cross_dataset|domain`` tabulates those
(``scripts/protocol_tables.py``). A method's rows are named by the display name its runs recorded (the method's
name in records written before runs recorded it): tables are read from the JSON records alone, with the labels,
column order and rendering of ``lora_zoo/tables.py``; neither torch, open_clip nor the method registry is loaded.

    python scripts/make_table.py outputs [--backbone ViT-B-16] [--rows lr] [--cols method_options.inner_rank]
                                 [--best_over lr] [--datasets benchmark] [--format md|latex|csv|all] [--plot_dir DIR]
    python scripts/make_table.py outputs --protocol base2new|cross_dataset|domain [--source imagenet]
    python scripts/make_table.py outputs --paper table2     # the paper's rows in its order, ours beside each value
    python scripts/make_table.py outputs --task commonsense     # the NoRA paper's Table 1 layout (lora_zoo/lm_tables.py)
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lora_zoo.results import (ABSENT, AXES, MISSING, average_text, cell_text, load_results, mean_std,  # noqa: E402
                              short_key, value_text)
from lora_zoo.tables import (PAPER_BACKBONE, TableError, column_order, dataset_label, display_names,  # noqa: E402
                             known_average, method_label, number_text, print_table, single, test_selected)
from scripts.protocol_tables import add_protocol_arguments, protocol_main  # noqa: E402


def canonical_key(key: str | None, runs, role: str, refused=("dataset", "shots", "seed", "backbone")):
    """``key`` as the settings spell it (``config.train.lr`` → ``lr``); ``TableError`` if no run can have it."""
    from lora_zoo.config import OPTION_GROUPS, config_keys
    if key is None:
        return None
    name = key.removeprefix("config.").removeprefix("train.")
    if name.startswith("method_config."):
        name = "method_options." + name.removeprefix("method_config.")
    group, _, option = name.partition(".")
    grouped = {k for r in runs for k, _ in r.setting if short_key(k) == name and k != name}
    if not option and name not in config_keys() and len(grouped) == 1:  # inner_rank → method_options.inner_rank
        return canonical_key(grouped.pop(), runs, role, refused)
    known = (name in AXES or name in config_keys() or (group in OPTION_GROUPS and option)
             or any(name in dict(r.setting) for r in runs))
    if not known or name in refused:
        raise TableError(f"--{role} {key}: expected method, run_name or a config key as --set spells it "
                         "(lr, batch_size, method_options.inner_rank, ...)" + (f", not {name}" if known else ""))
    return name


def order_of(value):
    """Sort key across types: n/a and null, then numbers, then text."""
    if value in (ABSENT, None):
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, value_text(value))


def determines(runs, keys, key) -> bool:
    """Whether the values of ``keys`` fix the value of ``key`` among ``runs``."""
    seen = {}
    return all(seen.setdefault(tuple(r.value(k) for k in keys), r.value(key)) == r.value(key) for r in runs)


def identity_keys(runs, rows, cols, best) -> list[str]:
    """The keys that tell one method's settings apart: ``rows`` first, ``best`` last, ``cols`` left out; a setting every
    run got from its method's recipe for its shots and dataset (CoOp's epochs by shots) splits nothing."""
    derived = frozenset.intersection(*(r.derived for r in runs)) if runs else frozenset()
    keys = {k for r in runs for k, _ in r.setting} - derived
    varying = sorted(k for k in keys if len({r.value(k) for r in runs}) > 1)
    if not determines(runs, varying, "run_name"):
        varying.append("run_name")
    lead = [rows] if rows not in (None, "method") else []
    if rows == "run_name":
        varying = [k for k in varying if not determines(runs, ["run_name"], k)]
    return lead + [k for k in varying if k not in (rows, cols, best)] + ([best] if best else [])


@dataclass
class Layout:
    """What one table shows: key roles, shots, seeds, methods in order, column datasets or values."""

    rows: str | None
    cols: str
    best: str | None
    shots: list[int]
    seeds: set[int]
    methods: list[str]
    test_selected: set = field(default_factory=set)  # identities of runs that selected on the test split


def settings(runs, layout: Layout):
    """``(identities in table order, {(identity, shots, column): {seed: accuracy}}, repeated runs)``; an identity
    is ``(method, (key, value), ...)``, a column a dataset or a value of ``layout.cols``. The identities a
    test-selected run belongs to are kept in ``layout.test_selected``."""
    index, identities, repeated = defaultdict(dict), {}, 0
    for method in layout.methods:
        mine = [r for r in runs if r.method == method]
        keys = identity_keys(mine, layout.rows, layout.cols, layout.best)
        for r in mine:
            if r.seed not in layout.seeds:
                continue
            ident = (method, *((k, r.value(k)) for k in keys))
            identities[ident] = None
            if test_selected(r):
                layout.test_selected.add(ident)
            cell = index[ident, r.shots, r.dataset if layout.cols == "dataset" else r.value(layout.cols)]
            repeated += r.seed in cell
            cell.setdefault(r.seed, r.accuracy)
    order = lambda ident: (layout.methods.index(ident[0]), *(order_of(v) for _, v in ident[1:]))
    return sorted(identities, key=order), index, repeated


def label(ident, names: dict[str, str], selected=()) -> str:
    """A setting's row: ``NoRA (ours, nora): lr=0.001`` (``names``: ``tables.display_names``), marked
    ``[test-selected]`` when it is among ``selected``."""
    options = ", ".join(f"{short_key(k)}={value_text(v)}" for k, v in ident[1:])
    return method_label(ident[0], names, ident in selected) + (f": {options}" if options else "")


def our_rows(runs, layout: Layout, columns: list, names: dict[str, str]) -> list[list[str]]:
    """One row per setting, each group of settings followed by its best-over row when asked."""
    expected = len(layout.seeds)
    identities, index, repeated = settings(runs, layout)
    if repeated:
        print(f"warning: {repeated} runs repeat a setting and seed already read; the first is used", file=sys.stderr)

    def cells(choose):  # choose(shots, column) -> ({seed: accuracy}, note)
        out = []
        for k in layout.shots:
            chosen = [choose(k, c) for c in columns]
            out += [cell_text(mean_std(p.values()), expected) + note for p, note in chosen]
            if layout.cols == "dataset":
                out.append(average_text([p for p, _ in chosen], expected))
        return out

    groups = defaultdict(list)
    for ident in identities:
        groups[ident[:-1] if layout.best else ident].append(ident)
    rows = []
    for group, members in groups.items():
        rows += [[label(m, names, layout.test_selected), *cells(lambda k, c, m=m: (index.get((m, k, c), {}), ""))] for m in members]
        if layout.best:
            def best(k, c):  # the member with the highest mean; the first in order on a tie
                found = [(statistics.fmean(p.values()), -i, p, m[-1][1]) for i, m in enumerate(members)
                         if (p := index.get((m, k, c)))]
                if not found:
                    return {}, ""
                _, _, p, value = max(found, key=lambda f: f[:2])
                return p, f" ({short_key(layout.best)}={value_text(value)})"
            rows.append([f"best {short_key(layout.best)} per cell, selected on the test split: {label(group, names, layout.test_selected)}",
                         *cells(best)])
    return rows


def zero_shot_of(runs, layout: Layout, dataset: str):
    """The zero-shot accuracy the runs of ``dataset`` recorded: one value, ``None`` (none recorded), or ``"varies"``
    (runs with other prompts or weights in one table)."""
    return single(r.zero_shot for r in runs if r.dataset == dataset and r.seed in layout.seeds)


def zero_shot_row(runs, layout: Layout, datasets: list[str]):
    """The base model without training (the same in every shot group), or None when no run recorded it."""
    found = [zero_shot_of(runs, layout, d) for d in datasets]
    if all(v is None for v in found):
        return None
    cells = [*map(number_text, found), known_average(found)]
    return [zero_shot_label(runs, layout, datasets), *cells * len(layout.shots)]


def zero_shot_label(runs, layout: Layout, datasets: list[str]) -> str:
    """The zero-shot row's name: a run recorded with ``pretrained: null`` started from random weights, so its
    zero-shot accuracy is not the pretrained model's (records without the key: pretrained)."""
    random_init = {r.value("pretrained") is None for r in runs
                   if r.dataset in datasets and r.seed in layout.seeds and r.zero_shot is not None}
    model = {frozenset({True}): "random init", frozenset({True, False}): "pretrained or random init"}.get(
        frozenset(random_init), "the pretrained model")
    return f"Zero-shot ({model}, no training)"


def reported_datasets(path: Path) -> list[str]:
    """The dataset columns of a reported-results CSV, in its order."""
    if not path.is_file():
        return []
    header = next(line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return [c for c in header.split(",") if c not in ("method", "shots", "average")]


def reported_rows(path: Path, shots_list, datasets):
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    by_method = defaultdict(dict)
    for row in csv.DictReader(lines):
        by_method[row["method"]][int(row["shots"])] = row
    rows = []
    for method, per_shots in by_method.items():
        cells = []
        for shots in shots_list:
            row = per_shots.get(shots)
            cells += [row[k] if row and row.get(k) else MISSING for k in [*datasets, "average"]]
        rows.append([f"{method} (paper)", *cells])
    return rows


def shot_curves(runs, layout: Layout, dataset: str) -> list[tuple[str, list[tuple[int, float, float | None]]]]:
    """What the plot of ``dataset`` draws: per setting, ``(label, [(shots, mean, sample std), ...])``."""
    identities, index, _ = settings(runs, layout)
    names = display_names(runs)
    curves = [(label(ident, names, layout.test_selected), [(k, *mean_std(index[ident, k, dataset].values())[:2]) for k in layout.shots
                              if index.get((ident, k, dataset))]) for ident in identities]
    return [(name, points) for name, points in curves if points]


def plot(runs, layout: Layout, backbone: str, datasets: list[str], plot_dir: Path) -> None:
    from scripts.plot_shots import draw
    for dataset in datasets:
        zero_shot = zero_shot_of(runs, layout, dataset)
        path = plot_dir / f"shots_{dataset}_{backbone.replace('/', '-')}.png"
        if not draw(shot_curves(runs, layout, dataset), zero_shot if isinstance(zero_shot, float) else None,
                    f"{dataset_label(dataset)} ({backbone})", path):
            print("matplotlib is not installed: skipping the accuracy-vs-shots plots (pip install matplotlib)",
                  file=sys.stderr)
            return
        print(f"wrote {path}", file=sys.stderr)


def column_datasets(requested, present, reported_order) -> list[str]:
    """``requested`` (``benchmark``: CoOp's eleven; ``all``: those and every other with results), else every
    dataset with results: the paper's first, in its order, then CoOp's order, then the rest."""
    from datasets import BENCHMARK_DATASETS, list_datasets
    paper_first = [] if requested in (["benchmark"], ["all"]) else reported_order  # those two: CoOp's order
    fixed = list(dict.fromkeys([*paper_first, *BENCHMARK_DATASETS]))
    return column_order(requested, present, fixed, list_datasets(), always=False)


def tables(runs, args, backbone: str) -> list[tuple[str, list[str], list[str], list]]:
    """``(header lines, column groups, header, rows)`` of each table for one backbone."""
    mine = [r for r in runs if r.backbone == backbone and (not args.methods or r.method in args.methods)]
    names, methods = display_names(mine), args.methods or sorted({r.method for r in mine})
    seeds = args.seeds or sorted({r.seed for r in mine})
    layout = Layout(args.rows, args.cols, args.best_over, args.shots or sorted({r.shots for r in mine}), set(seeds),
                    methods)
    paper = not args.no_reported and args.cols == "dataset" and args.reported.is_file()
    datasets = column_datasets(args.datasets, {r.dataset for r in mine},
                               reported_datasets(args.reported) if paper else [])
    notes = []
    if args.best_over:
        notes.append(f"'best {short_key(args.best_over)} per cell' rows: in each cell the {short_key(args.best_over)} with the "
                     "highest mean test accuracy, selected on the test split (as a W&B grid reports it): optimistic, "
                     "not a protocol result")
    if args.cols == "dataset":
        notes.append("Average: for each seed, the mean over the datasets the row has (seeds all of them have); "
                     "[k/D datasets] = only k of the D columns")
    if paper and backbone != PAPER_BACKBONE:
        notes.append(f"paper rows ({args.reported.name}, ViT-B/16) left out: these results are {backbone}")
        paper = False
    elif paper:
        notes.append(f"paper rows: {args.reported.name}; their Average is over "
                     + ", ".join(map(dataset_label, reported_datasets(args.reported))))
    if args.unreadable:
        notes.append(f"{args.unreadable} result.json skipped, unreadable or not a finite accuracy (see the warnings)")

    def title(where: str) -> str:
        return "\n".join([f"Top-1 accuracy (%), {where}; ours: mean ± sample std over seeds {seeds}; "
                          f"(n/{len(seeds)}) = seeds found; {MISSING} = no run", *notes])
    groups = [f"{k}-shot" for k in layout.shots]
    if args.cols == "dataset":
        if args.plot_dir:
            plot(mine, layout, backbone, datasets, args.plot_dir)
        rows = reported_rows(args.reported, layout.shots, datasets) if paper else []
        zero_shot = zero_shot_row(mine, layout, datasets)
        rows += ([zero_shot] if zero_shot else []) + our_rows(mine, layout, datasets, names)
        return [(title(backbone), groups, ["Method", *map(dataset_label, datasets), "Average"], rows)]
    out = []
    for dataset in datasets:
        in_dataset = [r for r in mine if r.dataset == dataset]
        values = sorted({r.value(args.cols) for r in in_dataset}, key=order_of)
        out.append((title(f"{backbone}, {dataset_label(dataset)}"), groups,
                    ["Method", *(f"{short_key(args.cols)}={value_text(v)}" for v in values)],
                    our_rows(in_dataset, layout, values, names)))
    return out


def paper_main(args) -> int:
    """``--paper NAME``: a paper's table row by row (``lora_zoo/paper_table.py``), ours beside its values."""
    from lora_zoo.paper_table import paper_table, paper_tables
    runs, _ = load_results(args.results)
    try:
        table = paper_table(args.paper)
        if args.backbone and args.backbone not in {r.backbone for r in runs}:
            raise TableError(f"no results for backbone {args.backbone} under {args.results}")
    except ValueError as err:
        print(f"error: --paper {args.paper}: {err}", file=sys.stderr)
        return 2
    for title, groups, head, rows in paper_tables(table, runs, args.reported, args.backbone):
        print_table(title, head, rows, args.format, groups)
    return 0


def commonsense_main(args) -> int:
    from lora_zoo.lm_tables import load_commonsense, tables as commonsense_tables

    runs, unreadable = load_commonsense(args.results)
    if not runs:
        print(f"error: no readable commonsense result.json under {args.results}"
              + (f" ({unreadable} unreadable)" if unreadable else ""), file=sys.stderr)
        return 2
    for title, head, rows in commonsense_tables(runs):
        print_table(title, head, rows, args.format)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results folder (main.py --output_dir)")
    parser.add_argument("--backbone", help="backbone to tabulate (default: every one found, one table each)")
    parser.add_argument("--methods", nargs="+", help="our methods to show, in order (default: all found)")
    parser.add_argument("--datasets", nargs="+", help="datasets, in order; benchmark = CoOp's eleven, all = those "
                                                      "and any other with results (default: every one with results)")
    parser.add_argument("--shots", nargs="+", type=int, help="shot counts (default: every one found)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds a complete cell has (default: every one found)")
    parser.add_argument("--rows", metavar="KEY", help="lead and order rows by KEY: method, run_name or a config key")
    parser.add_argument("--cols", metavar="KEY", default="dataset", help="dataset (default), or KEY: its values as "
                                                                          "columns, one table per dataset")
    parser.add_argument("--best_over", metavar="KEY", help="add the best KEY per cell (selected on the test split)")
    parser.add_argument("--reported", type=Path, default=REPO / "reported" / "nora_table2.csv",
                        help="paper results CSV shown beside ViT-B-16 results (default: the NoRA paper's Table 2)")
    parser.add_argument("--no_reported", action="store_true", help="do not show the paper's rows")
    parser.add_argument("--format", choices=["md", "latex", "csv", "all"], default="all")
    parser.add_argument("--plot_dir", type=Path, help="write accuracy-vs-shots PNGs here (needs matplotlib)")
    parser.add_argument("--paper", metavar="TABLE", help="a paper's table row by row, ours beside its values: table2 "
                                                         "(the NoRA paper's, lora_zoo/paper_table.py)")
    add_protocol_arguments(parser)
    parser.add_argument("--task", choices=["classification", "commonsense"], default="classification",
                        help="commonsense: the runs of main.py --task commonsense, in Table 1's columns")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: results folder not found: {args.results}", file=sys.stderr)
        return 1
    if args.paper:
        return paper_main(args)
    if args.task == "commonsense":
        return commonsense_main(args)
    if args.protocol != "fewshot":  # base-to-new, cross-dataset, domain generalisation: scripts/protocol_tables.py
        return protocol_main(args)
    runs, args.unreadable = load_results(args.results)
    backbones = sorted({r.backbone for r in runs}, key=lambda b: (b != PAPER_BACKBONE, b))
    try:
        args.rows = canonical_key(args.rows, runs, "rows")
        args.best_over = canonical_key(args.best_over, runs, "best_over", refused=("method", *AXES[2:]))
        if args.cols != "dataset":
            args.cols = canonical_key(args.cols, runs, "cols", refused=("shots", "seed", "backbone"))
        roles = [k for k in (args.rows, args.cols, args.best_over) if k]
        if len(set(roles)) < len(roles):
            raise TableError("--rows, --cols and --best_over need different keys")
        if args.backbone and args.backbone not in backbones:
            raise TableError(f"no results for backbone {args.backbone} under {args.results} "
                             f"(found: {', '.join(backbones) or 'none'})")
        if not runs:
            raise TableError(f"no readable result.json under {args.results}"
                             + (f" ({args.unreadable} unreadable)" if args.unreadable else ""))
        shown = [t for b in ([args.backbone] if args.backbone else backbones) for t in tables(runs, args, b)]
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(backbones) > 1 and not args.backbone:
        print(f"results of {len(backbones)} backbones ({', '.join(backbones)}): one table each\n")
    for notes, groups, head, rows in shown:
        print_table(notes, head, rows, args.format, groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
