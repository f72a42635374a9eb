"""The plan of a sweep (``scripts/sweep.py``): its runs, each configuration checked, and where each one stands.

A run is one ``main.py`` command. The protocol (``--protocol``) decides what the runs are:

- ``fewshot``: methods × datasets × shots (1 2 4 8 16) × seeds (1 2 3) × grid points;
- ``base2new``: the same runs with ``--protocol base2new`` (CoOp's base-to-new split; run folders
  ``<dataset>/base2new/...``), 16 shots unless ``--shots``; each dataset needs two classes or more;
- ``cross_dataset``: few-shot runs on the source (``--source``, ImageNet), 16 shots, each with
  ``--eval_on`` every other benchmark dataset found under the root (CoOp/CoCoOp's transfer protocol);
- ``domain``: the same source runs with ``--eval_on`` the ImageNet variants found (``DOMAIN_DATASETS``).

``--table 2`` plans a paper's table instead of ``--methods``: the rows of the NoRA paper's Table 2 and ours
beside them (``lora_zoo/paper_table.py``) whose methods this checkout registers, over its datasets and shots.

Where a run stands (``standing``): finished when its ``result.json`` is and every target has its
``eval_on/<target>.json``; a finished run with targets missing is pending evaluation only (``main.py``
reloads its saved adapters and evaluates the missing targets, no training); a run whose folder another
process claims (``lora_zoo.runlock``) is running elsewhere and left alone. Nothing heavy is imported
until a function needs it (``sweep.py --help`` stays fast).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: the sweep's own axes and paths: set with its options, not with --grid
AXES = ("method", "dataset", "shots", "seed", "backbone", "root_path", "output_dir", "run_name", "protocol")
PROTOCOLS = ("fewshot", "base2new", "cross_dataset", "domain")
TRANSFER = ("cross_dataset", "domain")  # few-shot runs on a source, evaluated on other datasets
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)  # the few-shot protocol's shots; the others train at 16


class SweepError(ValueError):
    """A bad sweep request; printed as one line, exit code 2."""


@dataclass
class Run:
    """One planned main.py run."""

    argv: list[str]
    folder: Path
    output_dir: Path
    label: str
    cfg: object = None  # the ExperimentConfig main.run(argv) will run
    targets: tuple[str, ...] = ()  # datasets its adapters are evaluated on (--eval_on)


@dataclass
class Standing:
    """The runs of a sweep sorted by where they stand."""

    finished: list = field(default_factory=list)
    elsewhere: list = field(default_factory=list)  # (run, runlock.Holder): claimed by another process
    pending: list = field(default_factory=list)    # to run here (train, or evaluate on missing targets only)
    evaluate_only: int = 0                         # of the pending: trained already, targets missing

    def summary(self) -> str:
        total = len(self.finished) + len(self.elsewhere) + len(self.pending)
        return (f"{total} runs, {len(self.finished)} finished, "
                + (f"{len(self.elsewhere)} running elsewhere, " if self.elsewhere else "")
                + f"{len(self.pending)} to do" + (f" ({self.evaluate_only} to evaluate only)"
                                                  if self.evaluate_only else ""))


def words(values, option: str) -> list[str]:
    """``["lora nora", "dora,vera"]`` → ``["lora", "nora", "dora", "vera"]``; none is an error."""
    found = [word for value in values for word in re.split(r"[\s,]+", value) if word]
    if not found:
        raise SweepError(f"--{option} needs at least one value")
    return found


def integers(values, option: str) -> list[int]:
    out = []
    for word in words(values, option):
        try:
            out.append(int(word))
        except ValueError:
            raise SweepError(f"--{option} expects integers, got {word!r}") from None
    return out


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"1e-3,[q,v]"`` → ``["1e-3", "[q,v]"]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_grid(specs) -> list[tuple[str, list[str]]]:
    """``["lr=1e-3,5e-4"]`` → ``[("lr", ["1e-3", "5e-4"])]`` (value texts as given; keys checked)."""
    from lora_zoo.config import merge_values
    from lora_zoo.options import yaml_value
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        texts = [t.strip() for t in split_top_level(values)]
        if not sep or not key or not all(texts):
            raise SweepError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        if key in AXES:
            raise SweepError(f"--grid {key}: set {key} with the sweep's own option, not --grid")
        if key in (k for k, _ in grid):
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid")
        try:
            merge_values({}, {key: yaml_value(texts[0])}, f"--grid {spec}")
        except ValueError as err:
            raise SweepError(str(err)) from None
        grid.append((key, texts))
    return grid


def grid_points(grid) -> list[list[tuple[str, str]]]:
    """Every combination of the grid's values, the last key varying fastest (``[[]]`` without a grid)."""
    points = [[]]
    for key, texts in grid:
        points = [point + [(key, text)] for point in points for text in texts]
    return points


def run_name(point) -> str | None:
    """The run name of a grid point: its keys and values (``lr=0.001_inner_rank=8``), None without a grid."""
    from lora_zoo.options import yaml_value
    from lora_zoo.results import run_name_of
    return run_name_of([(key, yaml_value(text)) for key, text in point])


def refuse(message):
    raise SweepError(message)


def found(name: str, root: Path) -> bool:
    """Whether a folder of ``name`` (in either convention) is under ``root``: whether it is meant to be there."""
    from datasets.registry import get_spec
    return any(folder and (root / folder).is_dir() for folder in get_spec(name).folders)


def source_datasets(args, root: Path) -> list[str]:
    """The datasets the runs train on: ``--datasets`` (default: every benchmark found), or ``--source``."""
    from datasets.registry import BENCHMARK_DATASETS, DatasetError, get_spec, locate_dataset

    if args.protocol in TRANSFER:
        if args.datasets:
            raise SweepError(f"--protocol {args.protocol} trains on --source (default imagenet), not --datasets")
        names = [args.source or "imagenet"]
    elif args.source:
        raise SweepError("--source is the training dataset of --protocol cross_dataset or domain; "
                         f"--protocol {args.protocol} trains on --datasets")
    else:
        names = words(args.datasets, "datasets") if args.datasets else list(BENCHMARK_DATASETS)
    datasets = []
    for name in names:
        option = "--datasets" if args.protocol not in TRANSFER else "--source"
        try:
            if get_spec(name).test_only:
                raise DatasetError(f"{name} is a test-only dataset (it has no training images); evaluate on it "
                                   "with --protocol domain or --eval_on")
            locate_dataset(name, root)
            datasets.append(name)
        except DatasetError as err:
            if args.datasets or args.protocol in TRANSFER:  # named; the default takes every benchmark found
                raise SweepError(f"{option} {name}: {err}") from None
    if not datasets:
        raise SweepError(f"no benchmark dataset found under {root} (see DATASET.md; --datasets imagefolder "
                         "for your own)")
    return datasets


def eval_targets(args, root: Path, sources: list[str]) -> tuple[str, ...]:
    """The datasets every run is evaluated on: ``--eval_on``, else the protocol's targets found under ``root``
    (cross_dataset: the other benchmarks; domain: the ImageNet variants); each test set read now."""
    from datasets.registry import BENCHMARK_DATASETS, DOMAIN_DATASETS, DatasetError, build_test_dataset, get_spec

    if args.eval_on:
        names = list(dict.fromkeys(words(args.eval_on, "eval_on")))
    elif args.protocol in TRANSFER:
        pool = DOMAIN_DATASETS if args.protocol == "domain" else [d for d in BENCHMARK_DATASETS if d not in sources]
        names = [name for name in pool if found(name, root)]
        if not names:
            what = "ImageNet variants" if args.protocol == "domain" else "other benchmark datasets"
            raise SweepError(f"--protocol {args.protocol}: none of the {what} ({', '.join(pool)}) found under {root} "
                             "(see DATASET.md)")
    else:
        return ()
    for name in names:
        try:
            if name in sources:
                raise DatasetError("the runs train on it; a target is another dataset")
            if get_spec(name).split_format == "imagefolder":
                raise DatasetError("a folder of your own is a --root_path of its own, not a target under this one")
            build_test_dataset(name, root)
        except DatasetError as err:
            raise SweepError(f"--eval_on {name}: {err}") from None
    return tuple(names)


def check_base2new(datasets: list[str], root: Path) -> None:
    """Each dataset has the two classes or more a base-to-new split needs (read from its split, nothing written)."""
    from datasets.base2new import split_classes
    from datasets.imagenet import read_class_folders
    from datasets.registry import DatasetError, get_spec, locate_dataset, read_splits

    for name in datasets:
        spec, location = get_spec(name), locate_dataset(name, root)
        try:
            if spec.split_format == "class_folders":
                classnames = read_class_folders(location.image_dir, location.split_path)[1]
            else:
                classnames = read_splits(spec, location, write_split=False)[1]
            split_classes(name, classnames)
        except DatasetError as err:
            raise SweepError(f"--protocol base2new: {err}") from None


def table_methods(args, registered: list[str]) -> list[tuple[str, list[str]]]:
    """``--table N``: the paper table's rows (``lora_zoo/paper_table.py``) whose method this checkout registers, the
    others skipped with one warning line, ``--methods`` narrowing them; each with its options' arguments. Its
    datasets and shots become the defaults of ``--datasets`` and ``--shots``."""
    from lora_zoo.paper_table import paper_table

    if args.protocol != "fewshot":
        raise SweepError(f"--table {args.table} plans few-shot runs; leave out --protocol {args.protocol}")
    table = paper_table(f"table{args.table}")
    args.datasets = args.datasets or [" ".join(table.datasets)]
    args.shots = args.shots or [" ".join(map(str, table.shots))]
    rows = [row for row in table.rows if row.method in registered]
    skipped = [row.method for row in table.rows if row.method not in registered]
    if skipped:
        print(f"sweep: warning: --table {args.table}: not registered in this checkout, skipped: {', '.join(skipped)}",
              file=sys.stderr)
    if args.methods:
        wanted = words(args.methods, "methods")
        unknown = [m for m in wanted if m not in {row.method for row in rows}]
        if unknown:
            raise SweepError(f"--methods {unknown[0]}: not a registered row of --table {args.table} (rows here: "
                             f"{', '.join(row.method for row in rows)})")
        rows = [row for row in rows if row.method in wanted]
    return [(row.method, [arg for name, value in row.options for arg in (
        "--set", f"method_options.{name}={value if isinstance(value, str) else json.dumps(value)}")]
        + (["--run_name", row.run_name] if row.run_name else [])) for row in rows]


def axes(args, root: Path) -> tuple[list[tuple[str, list[str]]], list[str], list[int], list[int], tuple[str, ...]]:
    """Methods (each with the arguments of its table row, if any), datasets, shots, seeds and evaluation targets of
    the request, each checked."""
    from lora_zoo.catalog import list_methods

    if args.eval_on and args.protocol == "base2new":
        raise SweepError("--eval_on evaluates few-shot runs on other datasets; a base-to-new run is evaluated on "
                         "its own new classes")
    if args.table:
        methods = table_methods(args, list_methods())
    else:
        methods = [(m, []) for m in (words(args.methods, "methods") if args.methods else list_methods())]
    unknown = [m for m, _ in methods if m not in list_methods()]
    if unknown:
        raise SweepError(f"unknown method {unknown[0]!r} (registered: {', '.join(list_methods())})")
    datasets = source_datasets(args, root)
    if args.protocol == "base2new":
        check_base2new(datasets, root)
    shots = integers(args.shots, "shots") if args.shots else list(FEWSHOT_SHOTS if args.protocol == "fewshot"
                                                                  else (16,))
    return methods, datasets, shots, integers(args.seeds, "seeds"), eval_targets(args, root, datasets)


def common_arguments(args, root: Path, extra: list[str], targets: tuple[str, ...]) -> list[str]:
    """What every run of the sweep gets besides its axes: paths, backbone, configs, protocol, targets."""
    if any(arg == "--eval_on" or arg.startswith("--eval_on=") for arg in extra):
        raise SweepError("--eval_on after '--': give it to the sweep (before '--'), which then counts a run with "
                         "targets still to evaluate as pending")
    common = ["--root_path", str(root), "--quiet"]
    common += ["--backbone", args.backbone] if args.backbone else []
    common += ["--output_dir", os.path.abspath(args.output_dir)] if args.output_dir else []
    for path in args.config:
        common += ["--config", os.path.abspath(path)]
    common += ["--protocol", "base2new"] if args.protocol == "base2new" else []
    return common + (["--eval_on", ",".join(targets)] if targets else [])


def plan(args, extra: list[str]) -> list[Run]:
    """Every run of the sweep, each configuration built and checked; ``SweepError`` on the first bad one."""
    from lora_zoo.cli import parse_config
    from lora_zoo.runs import run_dir

    root = Path(os.path.abspath(args.root_path))
    if not root.is_dir():
        raise SweepError(f"--root_path is not a directory: {root}")
    methods, datasets, shots, seeds, targets = axes(args, root)
    if args.jobs < 1:
        raise SweepError(f"--jobs must be a positive integer, got {args.jobs}")
    grid = parse_grid(args.grid)
    if grid and "--run_name" in extra:
        raise SweepError("--run_name after '--' cannot be combined with --grid (each grid point is named by its "
                         "values)")
    common = common_arguments(args, root, extra, targets)
    protocol = "base2new" if args.protocol == "base2new" else "fewshot"  # what each run's config must say
    runs, folders = [], {}
    for dataset, k, seed, (method, row), point in itertools.product(datasets, shots, seeds, methods, grid_points(grid)):
        name = run_name(point)
        argv = ["--method", method, "--dataset", dataset, "--shots", str(k), "--seed", str(seed), *common, *extra, *row]
        argv += [arg for key, text in point for arg in ("--set", f"{key}={text}")]  # last: they win
        label = (f"{method} {dataset}{' base-to-new' if protocol == 'base2new' else ''} {k}-shot seed {seed}"
                 + (f" [{name}]" if name else ""))
        try:
            cfg = parse_config(argv, on_error=refuse)  # exactly what main.run(argv) will run
            if name:  # a preset's run name (configs/nora_authors.yaml: authors) leads the grid point's
                argv += ["--run_name", f"{cfg.run_name}-{name}" if cfg.run_name else name]
                cfg = parse_config(argv, on_error=refuse)
        except (ValueError, TypeError, OSError) as err:
            raise SweepError(f"{label}: {' '.join(str(err).split())}") from None
        if cfg.protocol != protocol:
            raise SweepError(f"{label}: its config sets protocol {cfg.protocol} (a --config file, '--' or --set); "
                             f"choose the protocol with the sweep's --protocol")
        folder = run_dir(cfg)
        if folder in folders:
            raise SweepError(f"{label} and {folders[folder]} would share the run folder {folder}")
        folders[folder] = label
        runs.append(Run(argv, folder, Path(cfg.output_dir), label, cfg, targets))
    return runs


def missing_targets(run: Run) -> list[str]:
    """The targets of ``run`` without their ``eval_on/<target>.json``."""
    from lora_zoo.runs import target_file
    return [target for target in run.targets if not target_file(run.folder, target).is_file()]


def is_complete(run: Run) -> bool:
    """Whether ``run`` finished and is evaluated on every target (nothing left for the sweep to do)."""
    from lora_zoo.runs import is_finished
    return is_finished(run.folder) and not missing_targets(run)


def standing(runs: list[Run]) -> Standing:
    """Sort the runs: finished, running elsewhere (claimed by another process), pending. A finished run with other
    settings where a run would go is a ``ValueError`` (``runs.is_finished``)."""
    from lora_zoo.runlock import claimed_by
    from lora_zoo.runs import is_finished

    sorted_runs = Standing()
    for run in runs:
        trained = is_finished(run.folder, run.cfg)
        if trained and not missing_targets(run):
            sorted_runs.finished.append(run)
            continue
        holder = claimed_by(run.folder)
        if holder is not None:
            sorted_runs.elsewhere.append((run, holder))
            continue
        sorted_runs.pending.append(run)
        sorted_runs.evaluate_only += trained
    return sorted_runs
