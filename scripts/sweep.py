"""Sweep main.py over methods × datasets × shots × seeds × a grid of any config options.

The protocol's axes (docs/METHODS.md: shots 1 2 4 8 16, seeds 1 2 3) plus ``--grid KEY=V1,V2,...`` over any
key ``main.py --set`` accepts. Each grid point is its own run folder, ``<method>-<run name>``, the run name
spelling its values (``lr=0.001_inner_rank=8``) after a preset's own (``authors-lr=0.01``). Every run's
configuration is built before the first starts (a bad request is one line, exit 2, nothing run). Finished
runs are skipped, so a killed sweep restarts where it stopped; a finished run with other settings where a
run would go is an error. ``--jobs 1``: in this process; ``--jobs N``: N ``main.py`` processes, one GPU each
(on CPU, the cores shared out), logs in ``OUTPUT_DIR/sweep_logs/``; ``--slurm FILE``: an sbatch array.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
#: the sweep's own axes and paths: set with its options, not with --grid
AXES = ("method", "dataset", "shots", "seed", "backbone", "root_path", "output_dir", "run_name")


class SweepError(ValueError):
    """A bad sweep request; printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    words = "space- or comma-separated, quoted or as several words"
    parser = OneLineParser(
        prog="scripts/sweep.sh", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Finished runs are skipped: run the same command again to continue a killed sweep. "
               "After the options, '--' passes the rest to every main.py run, e.g. -- --n_iters 2 --set precision=fp32. "
               "Example: scripts/sweep.sh --root_path DATA --methods nora --datasets dtd --shots 4 "
               "--grid lr=1e-3,5e-4 --grid method_options.inner_rank=8,16")
    parser.add_argument("--root_path", required=True, help="folder holding the datasets (DATASET.md)")
    parser.add_argument("--methods", nargs="+", metavar="M", help=f"methods ({words}; default: every registered one)")
    parser.add_argument("--datasets", nargs="+", metavar="D",
                        help=f"datasets ({words}; default: every benchmark dataset found under --root_path)")
    parser.add_argument("--shots", nargs="+", default=["1 2 4 8 16"], metavar="K", help="shots (default 1 2 4 8 16)")
    parser.add_argument("--seeds", nargs="+", default=["1 2 3"], metavar="S", help="seeds (default 1 2 3)")
    parser.add_argument("--backbone", help="open_clip model or tiny-* backbone (default: main.py's, ViT-B-16)")
    parser.add_argument("--output_dir", help="results root (default: main.py's, outputs)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config passed to every run (repeatable, in order)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="sweep a config key over values (repeatable: the product of all); values are YAML, "
                             "a list in brackets, e.g. targets=[q,v],[q,k,v]")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at once (default 1: one after another in this process); N > 1: main.py "
                             "processes, one GPU each, logs in OUTPUT_DIR/sweep_logs/")
    parser.add_argument("--python", metavar="PY", help="Python to run with (default: the repository's .venv, "
                                                        "else python3; $PYTHON too)")
    parser.add_argument("--slurm", metavar="FILE", help="write an sbatch job array of the pending runs, run nothing")
    parser.add_argument("--slurm_header", default="", metavar="LINES", help='extra lines, e.g. "#SBATCH -p gpu"')
    parser.add_argument("--dry_run", action="store_true", help="print the main.py commands of the pending runs")
    return parser


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


@dataclass
class Run:
    """One planned main.py run."""

    argv: list[str]
    folder: Path
    output_dir: Path
    label: str
    cfg: object = None  # the ExperimentConfig main.run(argv) will run


def refuse(message):
    raise SweepError(message)


def axes(args, root: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    """Methods, datasets, shots and seeds of the request, each checked; ``SweepError`` otherwise."""
    from datasets.registry import BENCHMARK_DATASETS, DatasetError, locate_dataset
    from lora_zoo.registry import list_methods

    methods = words(args.methods, "methods") if args.methods else list_methods()
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        raise SweepError(f"unknown method {unknown[0]!r} (registered: {', '.join(list_methods())})")
    datasets = []
    for name in words(args.datasets, "datasets") if args.datasets else BENCHMARK_DATASETS:
        try:
            locate_dataset(name, root)
            datasets.append(name)
        except DatasetError as err:
            if args.datasets:  # asked for by name; the default takes every benchmark dataset found
                raise SweepError(f"--datasets {name}: {err}") from None
    if not datasets:
        raise SweepError(f"no benchmark dataset found under {root} (see DATASET.md; --datasets imagefolder "
                         "for your own)")
    return methods, datasets, integers(args.shots, "shots"), integers(args.seeds, "seeds")


def plan(args, extra: list[str]) -> list[Run]:
    """Every run of the sweep, each configuration built and checked; ``SweepError`` on the first bad one."""
    from lora_zoo.cli import parse_config
    from lora_zoo.runs import run_dir

    root = Path(os.path.abspath(args.root_path))
    if not root.is_dir():
        raise SweepError(f"--root_path is not a directory: {root}")
    methods, datasets, shots, seeds = axes(args, root)
    if args.jobs < 1:
        raise SweepError(f"--jobs must be a positive integer, got {args.jobs}")
    grid = parse_grid(args.grid)
    if grid and "--run_name" in extra:
        raise SweepError("--run_name after '--' cannot be combined with --grid (each grid point is named by its "
                         "values)")
    common = ["--root_path", str(root), "--quiet"]
    common += ["--backbone", args.backbone] if args.backbone else []
    common += ["--output_dir", os.path.abspath(args.output_dir)] if args.output_dir else []
    for path in args.config:
        common += ["--config", os.path.abspath(path)]
    runs, folders = [], {}
    for dataset, k, seed, method, point in itertools.product(datasets, shots, seeds, methods, grid_points(grid)):
        name = run_name(point)
        argv = ["--method", method, "--dataset", dataset, "--shots", str(k), "--seed", str(seed), *common, *extra]
        argv += [arg for key, text in point for arg in ("--set", f"{key}={text}")]  # last: they win
        label = f"{method} {dataset} {k}-shot seed {seed}" + (f" [{name}]" if name else "")
        try:
            cfg = parse_config(argv, on_error=refuse)  # exactly what main.run(argv) will run
            if name:  # a preset's run name (configs/nora_authors.yaml: authors) leads the grid point's
                argv += ["--run_name", f"{cfg.run_name}-{name}" if cfg.run_name else name]
                cfg = parse_config(argv, on_error=refuse)
        except (ValueError, TypeError, OSError) as err:
            raise SweepError(f"{label}: {' '.join(str(err).split())}") from None
        folder = run_dir(cfg)
        if folder in folders:
            raise SweepError(f"{label} and {folders[folder]} would share the run folder {folder}")
        folders[folder] = label
        runs.append(Run(argv, folder, Path(cfg.output_dir), label, cfg))
    return runs


def visible_gpus() -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` if set (empty: none), else one entry per GPU ``nvidia-smi -L`` lists (none: CPU)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # "": GPUs hidden on purpose
        return [gpu for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(i) for i in range(sum(line.startswith("GPU") for line in listing.splitlines()))]
    return []


def run_in_process(pending: list[Run]) -> int:
    """Each run through ``main.py``'s ``run`` in this process; returns the number that failed."""
    from lora_zoo.cli import run as run_main

    failed = 0
    for run in pending:
        print(f"sweep: start {run.label}", file=sys.stderr, flush=True)
        try:
            code = run_main(run.argv)
        except Exception:  # an unexpected crash of one run: shown in full, and the sweep goes on
            traceback.print_exc()
            code = 1
        if code == 130:
            raise KeyboardInterrupt
        if code:
            failed += 1
            print(f"sweep: FAILED {run.label}", file=sys.stderr, flush=True)
    return failed


def run_in_processes(pending: list[Run], jobs: int, log_dir: Path) -> int:
    """``jobs`` main.py processes at once, one GPU each (on CPU, CPUs // jobs threads each); returns the number
    that failed."""
    from lora_zoo.host import available_cpus
    gpus, queue, running, failed = visible_gpus(), list(pending), {}, 0
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                slot = min(set(range(jobs)) - set(running))
                run = queue.pop(0)
                # one GPU each; on CPU the cores shared out, so that the runs do not oversubscribe them
                env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else
                                          {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                             str(max(1, available_cpus() // jobs)))}))
                log = log_dir / ("_".join(run.folder.relative_to(run.output_dir).parts) + ".out")
                print(f"sweep: start {run.label} (log {log})", file=sys.stderr, flush=True)
                with open(log, "w") as handle:
                    running[slot] = (subprocess.Popen([sys.executable, str(MAIN), *run.argv], stdout=handle,
                                                      stderr=subprocess.STDOUT, env=env), run, log)
            time.sleep(0.1)
            for slot, (proc, run, log) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    if proc.returncode:
                        failed += 1
                        print(f"sweep: FAILED {run.label} (see {log})", file=sys.stderr, flush=True)
    finally:
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
    return failed


def write_slurm(pending: list[Run], path: Path, header: str, log_dir: Path) -> None:
    """An sbatch job array, one task per pending run; a task whose run has finished meanwhile exits at once."""
    finished = "import sys; from lora_zoo.runs import is_finished; sys.exit(0 if is_finished(sys.argv[1]) else 1)"
    lines = ["#!/usr/bin/env bash", "#SBATCH --job-name=lora_zoo_sweep", f"#SBATCH --array=0-{len(pending) - 1}",
             "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", f"#SBATCH --output={log_dir}/%A_%a.out",
             *([header] if header else []),
             "# generated by scripts/sweep.sh: one array task per pending run", "set -euo pipefail",
             f"cd {shlex.quote(os.getcwd())}", "RUNS=("]
    lines += [f"  {shlex.quote(shlex.join(run.argv))}" for run in pending] + [")", "FOLDERS=("]
    lines += [f"  {shlex.quote(str(run.folder))}" for run in pending] + [")"]
    python = shlex.quote(sys.executable)
    lines += ['folder="${FOLDERS[$SLURM_ARRAY_TASK_ID]}"',
              f'if PYTHONPATH={shlex.quote(str(REPO))} {python} -c {shlex.quote(finished)} "$folder"; then',
              '  echo "finished already: $folder"; exit 0', "fi",
              'eval "set -- ${RUNS[$SLURM_ARRAY_TASK_ID]}"', f'exec {python} {shlex.quote(str(MAIN))} "$@"']
    from lora_zoo.files import write_text
    log_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(lines) + "\n")


def reexec_with(python: str, argv: list[str]) -> None:
    """Start this script again with ``python`` (``--python`` dropped), before anything heavy is imported."""
    found = shutil.which(python)
    if found is None:
        raise SweepError(f"--python {python}: no such Python")
    cut = argv.index("--") if "--" in argv else len(argv)
    at = next(i for i, arg in enumerate(argv) if arg == "--python" or arg.startswith("--python="))
    argv = argv[:at] + argv[at + (1 if "=" in argv[at] else 2):cut] + argv[cut:]
    os.execv(found, [found, str(Path(__file__).resolve()), *argv])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        args = build_parser().parse_args(argv[:cut])
        if args.python:
            reexec_with(args.python, argv)
        sys.path.insert(0, str(REPO))
        try:
            import open_clip  # noqa: F401  (and torch: what every run needs, from the Python that runs them)
        except ImportError as err:
            raise SweepError(f"cannot import lora_zoo with {sys.executable} ({err}); create the venv (README) "
                             "or pass --python PY") from None
        runs = plan(args, argv[cut + 1:])
    except SweepError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    from lora_zoo.cli import sigterm_as_interrupt
    from lora_zoo.runs import is_finished

    try:
        pending = [run for run in runs if not is_finished(run.folder, run.cfg)]
    except ValueError as err:  # a finished run with other settings where this sweep would write
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    print(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to do", file=sys.stderr)
    log_dir = runs[0].output_dir / "sweep_logs"
    if args.dry_run:
        for run in pending:
            print(shlex.join([sys.executable, str(MAIN), *run.argv]))
        return 0
    if args.slurm:
        if not pending:
            print("sweep: nothing to do, no script written", file=sys.stderr)
            return 0
        path = Path(os.path.abspath(args.slurm))
        write_slurm(pending, path, args.slurm_header, log_dir)
        print(f"sweep: wrote {path} (array of {len(pending)}); submit with: sbatch {path}", file=sys.stderr)
        return 0
    try:
        with sigterm_as_interrupt():  # a kill stops the sweep the way Ctrl-C does
            failed = (run_in_process(pending) if args.jobs == 1 else run_in_processes(pending, args.jobs, log_dir))
    except KeyboardInterrupt:
        print("sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if failed:
        print(f"sweep: {failed} of {len(pending)} runs failed", file=sys.stderr)
        return 1
    print("sweep: done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
