"""The tables of base-to-new generalisation, cross-dataset transfer and domain generalisation.

``scripts/make_table.py --protocol base2new|cross_dataset|domain`` lays out the
three protocols that CLIP adaptation papers report beside the few-shot table
(CoCoOp, Zhou et al., CVPR 2022, Tables 1-3; MaPLe, PromptSRC), as they lay
them out:

- ``base2new``: for each dataset, then for the average over the datasets
  (first, as the papers put it), the zero-shot model and each setting, with
  Base, New and HM. HM is the harmonic mean of the Base and New shown; for the
  average, of the average Base and average New, not the mean of the datasets'
  HMs. Its ± is the sample std over seeds of the per-seed HM.
- ``cross_dataset``: the source (ImageNet) | the ten other benchmarks | their
  average, for runs trained on the source and evaluated on each target.
- ``domain``: ImageNet | ImageNet-V2 | -Sketch | -A | -R | the average of the
  four targets.

A cell is mean ± sample std over the seeds found, ``(n/N)`` with fewer seeds
than the table's, "—" with no run; an average is taken per seed over the
datasets the row has (``[k/D datasets]`` when some are missing). Rows are
settings named by method (the display name the runs recorded) and run name (the
run folder's name). One table per backbone and shot count. Records are read by
``lora_zoo.results``; labels, column order and rendering are ``lora_zoo.tables``
(no torch, open_clip or method registry import here).
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from lora_zoo.results import (MISSING, PROTOCOLS, average_text, cell_text, harmonic_mean, load_base2new,
                              load_transfers, mean_std)
from lora_zoo.tables import (PAPER_BACKBONE, TableError, column_order, dataset_label, display_names, known_average,
                             method_label, number_text, print_table, single, test_selected)

ZERO_SHOT = "Zero-shot (the pretrained model, no training)"


def add_protocol_arguments(parser) -> None:
    parser.add_argument("--protocol", choices=PROTOCOLS, default="fewshot",
                        help="fewshot (default): the few-shot table; base2new: Base/New/HM per dataset; "
                             "cross_dataset: source | ten targets | average; domain: ImageNet | -V2 | -Sketch | "
                             "-A | -R | average (scripts/protocol_tables.py)")
    parser.add_argument("--source", default="imagenet",
                        help="cross_dataset and domain: the dataset the runs trained on (default: imagenet)")


def base_new_cells(per_seed: dict, expected: int, note: str = "") -> list[str]:
    """Base, New and HM cells of ``{seed: (base, new)}``: HM of the mean Base and mean New, ± over seeds."""
    if not per_seed:
        return [MISSING] * 3
    bases, news = zip(*per_seed.values())
    base, new = mean_std(bases), mean_std(news)
    hms = [harmonic_mean(b, n) for b, n in per_seed.values()]
    hm = (harmonic_mean(base[0], new[0]), statistics.stdev(hms) if len(hms) > 1 else None, len(hms))
    return [cell_text(stat, expected) + note for stat in (base, new, hm)]


def averaged(per_dataset: list[dict]) -> tuple[dict, str]:
    """``{seed: (mean base, mean new)}`` over the datasets present (seeds all of them have), and the mark."""
    present = [p for p in per_dataset if p]
    common = set.intersection(*(set(p) for p in present)) if present else set()
    mean = {s: (statistics.fmean(p[s][0] for p in present), statistics.fmean(p[s][1] for p in present))
            for s in sorted(common)}
    return mean, (f" [{len(present)}/{len(per_dataset)} datasets]" if len(present) < len(per_dataset) else "")


def zero_shot_base_new(runs, datasets: list[str]) -> list[list[str]]:
    """The pretrained model's Base/New/HM cells: their average over the datasets (first), then per dataset."""
    pairs = []
    for dataset in datasets:
        mine = [r for r in runs if r.dataset == dataset and None not in (r.zero_shot_base, r.zero_shot_new)]
        pairs.append((single(r.zero_shot_base for r in mine), single(r.zero_shot_new for r in mine)))
    both = lambda b, n: isinstance(b, float) and isinstance(n, float)
    cells = [[number_text(b), number_text(n), number_text(
        harmonic_mean(b, n) if both(b, n) else "varies" if "varies" in (b, n) else None)] for b, n in pairs]
    known = [(b, n) for b, n in pairs if both(b, n)]
    if not known:
        return [[MISSING] * 3] + cells
    base, new = statistics.fmean(b for b, _ in known), statistics.fmean(n for _, n in known)
    mark = f" [{len(known)}/{len(pairs)} datasets]" if len(known) < len(pairs) else ""
    return [[f"{base:.2f}{mark}", f"{new:.2f}{mark}", f"{harmonic_mean(base, new):.2f}{mark}"]] + cells


def settings_of(runs, methods) -> list[tuple]:
    """``(method, run name)`` of the runs: in ``methods``' order when given, else sorted."""
    rank = {m: i for i, m in enumerate(methods or [])}
    return sorted({(r.method, r.run_name) for r in runs}, key=lambda s: (rank.get(s[0], 0), s[0], s[1] or ""))


def base2new_rows(runs, datasets: list[str], seeds: list[int], label, methods=None) -> list[list[str]]:
    """``[dataset, row, Base, New, HM]`` rows: the average block first, then one block per dataset."""
    runs = [r for r in runs if r.seed in seeds]
    index, idents = defaultdict(dict), settings_of(runs, methods)
    for r in runs:
        index[(r.method, r.run_name), r.dataset].setdefault(r.seed, (r.base, r.new))
    zero_shot = zero_shot_base_new(runs, datasets)
    average = f"Average over {len(datasets)} datasets"
    rows = []
    if any(cells != [MISSING] * 3 for cells in zero_shot):
        rows += [[name, ZERO_SHOT, *cells] for name, cells in zip([average, *map(dataset_label, datasets)], zero_shot)]
    for ident in idents:
        per_seed, mark = averaged([index.get((ident, d), {}) for d in datasets])
        rows.append([average, label(*ident), *base_new_cells(per_seed, len(seeds), mark)])
    for dataset in datasets:
        rows += [[dataset_label(dataset), label(*ident), *base_new_cells(index.get((ident, dataset), {}), len(seeds))]
                 for ident in idents]
    order = [average, *map(dataset_label, datasets)]
    return sorted(rows, key=lambda row: (order.index(row[0]), row[1] != ZERO_SHOT))


def transfer_rows(runs, targets: list[str], seeds: list[int], label, methods=None) -> list[list[str]]:
    """``[row, source, *targets, average]`` rows: the zero-shot model, then each setting."""
    runs = [r for r in runs if r.seed in seeds]
    source, index, idents = defaultdict(dict), defaultdict(dict), settings_of(runs, methods)
    for r in runs:
        index[(r.method, r.run_name), r.target].setdefault(r.seed, r.accuracy)
        if r.source_accuracy is not None:
            source[r.method, r.run_name].setdefault(r.seed, r.source_accuracy)
    zero = [single(r.zero_shot for r in runs if r.target == t) for t in targets]
    source_zero = single(r.source_zero_shot for r in runs)
    rows = []
    if any(isinstance(v, float) for v in zero) or source_zero is not None:
        rows.append([ZERO_SHOT, number_text(source_zero), *map(number_text, zero), known_average(zero)])
    for ident in idents:
        per_target = [index.get((ident, t), {}) for t in targets]
        rows.append([label(*ident), cell_text(mean_std(source[ident].values()), len(seeds)),
                     *(cell_text(mean_std(p.values()), len(seeds)) for p in per_target),
                     average_text(per_target, len(seeds))])
    return rows


def load_protocol(args):
    """``(runs of args.protocol, how many records were unreadable)``; an error when there are none."""
    from datasets import DOMAIN_DATASETS
    if args.protocol == "base2new":
        runs, unreadable = load_base2new(args.results)
        what = 'base-to-new results (result.json with "protocol": "base2new")'
    else:
        runs, unreadable = load_transfers(args.results)
        domain = args.protocol == "domain"
        runs = [r for r in runs if (r.target in DOMAIN_DATASETS) == domain]
        sources = sorted({r.source for r in runs} - {args.source})
        runs = [r for r in runs if r.source == args.source]
        what = (f"{'domain-generalisation' if domain else 'cross-dataset'} results (eval_on/<target>.json) of runs "
                f"trained on {args.source}" + (f" (other sources found: {', '.join(sources)}; --source)"
                                               if sources else ""))
    runs = [r for r in runs if not args.methods or r.method in args.methods]
    if not runs:
        raise TableError(f"no {what} under {args.results}" + (f"; {unreadable} unreadable" if unreadable
                                                                     else ""))
    return runs, unreadable


def protocol_tables(args) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` of each table: one per backbone and shot count."""
    from datasets import BENCHMARK_DATASETS, DOMAIN_DATASETS, list_datasets
    runs, unreadable = load_protocol(args)
    names = display_names(runs)
    selected = {(r.method, r.run_name) for r in runs if test_selected(r)}  # marked [test-selected]
    label = lambda method, run_name: (method_label(method, names, (method, run_name) in selected)
                                      + (f": {run_name}" if run_name else ""))
    backbones = sorted({r.backbone for r in runs}, key=lambda b: (b != PAPER_BACKBONE, b))
    if args.backbone and args.backbone not in backbones:
        raise TableError(f"no {args.protocol} results for backbone {args.backbone} under {args.results} "
                                 f"(found: {', '.join(backbones)})")
    note = f"\n{unreadable} unreadable record(s) skipped (see the warnings)" if unreadable else ""
    out = []
    for backbone in [args.backbone] if args.backbone else backbones:
        mine = [r for r in runs if r.backbone == backbone]
        seeds = args.seeds or sorted({r.seed for r in mine})
        stats = (f"mean ± sample std over seeds {seeds}; (n/{len(seeds)}) = seeds found; {MISSING} = no run; "
                 "[k/D datasets] = an average over only k of the D columns")
        for shots in args.shots or sorted({r.shots for r in mine}):
            group = [r for r in mine if r.shots == shots]
            if args.protocol == "base2new":
                datasets = column_order(args.datasets, {r.dataset for r in group}, list(BENCHMARK_DATASETS),
                                        list_datasets(), always=False)
                title = (f"Base-to-new generalisation, {backbone}, {shots} shots per base class: top-1 accuracy (%) "
                         "on the test images of the base (Base) and new (New) classes, each scored over its own "
                         "classes' prompts; HM = harmonic mean of the Base and New shown (Average: of the average "
                         f"Base and New, as the papers compute it; its ± is over the per-seed HM); {stats}")
                out.append((title + note, ["Dataset", "Method", "Base", "New", "HM"],
                            base2new_rows(group, datasets, seeds, label, args.methods)))
                continue
            fixed = (list(DOMAIN_DATASETS) if args.protocol == "domain"
                     else [d for d in BENCHMARK_DATASETS if d != args.source])
            targets = column_order(args.datasets, {r.target for r in group}, fixed, list_datasets(), always=True)
            kind = "Domain generalisation" if args.protocol == "domain" else "Cross-dataset transfer"
            title = (f"{kind}, {backbone}: top-1 accuracy (%) of {shots}-shot runs trained on "
                     f"{dataset_label(args.source)} (source) on each target's test set, without retraining; "
                     f"Average = per seed, the mean over the {len(targets)} targets; {stats}")
            out.append((title + note, ["Method", f"{dataset_label(args.source)} (source)",
                                       *map(dataset_label, targets), "Average"],
                        transfer_rows(group, targets, seeds, label, args.methods)))
    return out


def protocol_main(args) -> int:
    """Print the ``args.protocol`` tables of ``args.results`` (make_table's parsed arguments); the exit code."""
    fewshot_only = [flag for flag, used in (("--rows", getattr(args, "rows", None)),
                                            ("--cols", getattr(args, "cols", "dataset") != "dataset"),
                                            ("--best_over", getattr(args, "best_over", None)),
                                            ("--plot_dir", getattr(args, "plot_dir", None))) if used]
    try:
        if fewshot_only:
            raise TableError(f"{fewshot_only[0]} lays out the few-shot table only; the {args.protocol} "
                                     "table has a fixed layout")
        shown = protocol_tables(args)
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for title, head, rows in shown:
        print_table(title, head, rows, args.format)
    return 0
