"""Tabulate a results folder in the layout of the NoRA paper's Table 2 (Li et al., ICCV 2025).

The datasets found in the results (or ``--datasets``), in the registry's order,
and their Average at 4 and 16 shots, top-1 (%) as mean ± std over seeds,
printed as Markdown, LaTeX and CSV. Methods are named by their registered
display names (``lora_zoo.get_method(name).display_name``). The paper's reported
rows (``../shared/reported/nora_table2.csv``) are shown beside ours. The std is the
*sample* standard deviation (ddof=1, numpy ``std(ddof=1)``) over the seeds found;
with one seed no std is shown. Average = mean over the datasets of each
seed's accuracy, over the seeds present for all of them (std likewise). A cell
with fewer seeds than ``--seeds`` lists is marked ``(n/3)``; a cell with no run
is "—": nothing is ever filled in. ``--plot_dir`` also writes an accuracy-vs-shots
PNG per dataset when matplotlib is installed.

    python scripts/make_table.py outputs [--backbone ViT-B-16] [--format md|latex|csv|all] [--plot_dir plots]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MISSING = "—"


def display_name(method: str) -> str:
    """The method's registered display name (the name itself for a method this checkout does not have)."""
    import lora_zoo
    return lora_zoo.get_method(method).display_name if method in lora_zoo.list_methods() else method


def dataset_columns(table, backbone, requested=None, reported_order=()) -> list[tuple[str, str]]:
    """``[(dataset, column label)]``: ``requested``, else every dataset with results — those of the paper's
    table first, in its order, then the others in CoOp's benchmark order. Labels are the registry's."""
    from datasets import BENCHMARK_DATASETS, get_spec, list_datasets
    present = {key[2] for key in table if key[0] == backbone}
    order = [d for d in (*reported_order, *BENCHMARK_DATASETS, *list_datasets()) if d in list_datasets()]
    names = requested or list(dict.fromkeys(d for d in order if d in present)) + sorted(present - set(order))
    return [(name, get_spec(name).display_name if name in list_datasets() else name) for name in names]


def reported_datasets(path: Path) -> list[str]:
    """The dataset columns of a reported-results CSV, in its order."""
    if not path.is_file():
        return []
    header = next(line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return [c for c in header.split(",") if c not in ("method", "shots", "average")]


def load_results(root: Path):
    """``{(backbone, method, dataset, shots): {seed: accuracy}}`` from every result.json under ``root``."""
    table = defaultdict(dict)
    for path in sorted(root.rglob("result.json")):
        try:
            r = json.loads(path.read_text())
            key = (r["backbone"], r["method"], r["dataset"], int(r["shots"]))
            table[key][int(r["seed"])] = float(r["accuracy"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"warning: skipping unreadable {path}: {err}", file=sys.stderr)
    return table


def mean_std(values):
    values = list(values)
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def cell_text(stat, expected: int) -> str:
    if stat is None:
        return MISSING
    mean, std, n = stat
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" ({n}/{expected})" if n < expected else "")


def our_rows(table, backbone, methods, shots_list, seeds, columns):
    rows = []
    for method in methods:
        cells = []
        for shots in shots_list:
            per_dataset = [{s: a for s, a in table.get((backbone, method, d, shots), {}).items() if s in seeds}
                           for d, _ in columns]
            cells += [cell_text(mean_std(p.values()), len(seeds)) for p in per_dataset]
            common = set.intersection(*(set(p) for p in per_dataset))
            averages = [statistics.fmean(p[s] for p in per_dataset) for s in sorted(common)]
            cells.append(cell_text(mean_std(averages), len(seeds)))
        rows.append((f"{display_name(method)} (ours, {method})", cells))
    return rows


def reported_rows(path: Path, shots_list, columns):
    if not path.is_file():
        print(f"warning: no reported results at {path}; showing ours only", file=sys.stderr)
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    by_method = defaultdict(dict)
    for row in csv.DictReader(lines):
        by_method[row["method"]][int(row["shots"])] = row
    rows = []
    for method, per_shots in by_method.items():
        cells = []
        for shots in shots_list:
            row = per_shots.get(shots)
            cells += [row[k] if row and row.get(k) else MISSING for k in [d for d, _ in columns] + ["average"]]
        rows.append((f"{method} (paper)", cells))
    return rows


def header(shots_list, columns):
    return ["Method"] + [f"{name} {k}-shot" for k in shots_list for name in [n for _, n in columns] + ["Average"]]


def render(rows, shots_list, columns, fmt: str) -> str:
    head = header(shots_list, columns)
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([name] + cells) + " |" for name, cells in rows]
        return "\n".join(lines)
    if fmt == "latex":
        tex = lambda s: s.replace("±", r"$\pm$").replace("—", "--").replace("%", r"\%").replace("_", r"\_")
        lines = [r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}", r"\toprule",
                 " & ".join(["Method"] + [rf"\multicolumn{{{len(columns) + 1}}}{{c}}{{{k}-shot}}" for k in shots_list])
                 + r" \\",
                 " & ".join([""] + [n for _ in shots_list for n in [n for _, n in columns] + ["Average"]]) + r" \\",
                 r"\midrule"]
        lines += [" & ".join(tex(c) for c in [name] + cells) + r" \\" for name, cells in rows]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])
    from io import StringIO
    out = StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([name] + cells for name, cells in rows)
    return out.getvalue().rstrip("\n")


def plot(table, backbone, methods, seeds, plot_dir: Path, columns) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the accuracy-vs-shots plots (pip install matplotlib)",
              file=sys.stderr)
        return
    plot_dir.mkdir(parents=True, exist_ok=True)
    for dataset, name in columns:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in methods:
            points = sorted((k, mean_std(a for s, a in runs.items() if s in seeds))
                            for (b, m, d, k), runs in table.items() if (b, m, d) == (backbone, method, dataset))
            points = [(k, st) for k, st in points if st is not None]
            if points:
                ax.errorbar([k for k, _ in points], [st[0] for _, st in points],
                            yerr=[st[1] or 0.0 for _, st in points], marker="o", capsize=3, label=method)
        ax.set(xscale="log", xlabel="shots per class", ylabel="top-1 (%)", title=f"{name} ({backbone})")
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_dir / f"shots_{dataset}.png", dpi=120)
        plt.close(fig)
        print(f"wrote {plot_dir / f'shots_{dataset}.png'}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results folder (main.py --output_dir)")
    parser.add_argument("--backbone", help="backbone to tabulate (default: the only one found, else ViT-B-16)")
    parser.add_argument("--methods", nargs="+", help="our methods to show, in order (default: all found)")
    parser.add_argument("--datasets", nargs="+", help="datasets to show, in order (default: every one with results)")
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--reported", type=Path, default=REPO / "reported" / "nora_table2.csv")
    parser.add_argument("--no_reported", action="store_true", help="do not show the paper's rows")
    parser.add_argument("--format", choices=["md", "latex", "csv", "all"], default="all")
    parser.add_argument("--plot_dir", type=Path, help="write accuracy-vs-shots PNGs here (needs matplotlib)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: results folder not found: {args.results}", file=sys.stderr)
        return 1
    table = load_results(args.results)
    backbones = sorted({key[0] for key in table})
    backbone = args.backbone or (backbones[0] if len(backbones) == 1 else "ViT-B-16")
    methods = args.methods or sorted({key[1] for key in table if key[0] == backbone})
    columns = dataset_columns(table, backbone, args.datasets, [] if args.no_reported else reported_datasets(args.reported))
    rows = ([] if args.no_reported else reported_rows(args.reported, args.shots, columns))
    rows += our_rows(table, backbone, methods, args.shots, set(args.seeds), columns)
    print(f"Top-1 accuracy (%), {backbone}; ours: mean ± sample std over seeds {args.seeds}; "
          f"(n/{len(args.seeds)}) = seeds found; {MISSING} = no run\n")
    for fmt in (["md", "latex", "csv"] if args.format == "all" else [args.format]):
        print(render(rows, args.shots, columns, fmt) + "\n")
    if args.plot_dir:
        plot(table, backbone, methods, set(args.seeds), args.plot_dir, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
