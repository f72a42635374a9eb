"""Sweep main.py over methods × datasets × shots × seeds × a grid of any config options, in any of four protocols.

The protocol's axes (docs/METHODS.md: shots 1 2 4 8 16, seeds 1 2 3) plus ``--grid KEY=V1,V2,...`` over any
key ``main.py --set`` accepts. Each grid point is its own run folder, ``<method>-<run name>``, the run name
spelling its values (``lr=0.001_inner_rank=8``) after a preset's own (``authors-lr=0.01``). ``--protocol``
picks the protocol: ``fewshot`` (default), ``base2new`` (base-to-new runs, 16 shots), ``cross_dataset`` (the
``--source`` dataset, ImageNet, 16 shots, each run evaluated on every other benchmark found) or ``domain``
(the same source runs evaluated on the ImageNet variants found); ``scripts/sweep_plan.py`` plans the runs.
Every run's configuration is built before the first starts (a bad request is one line, exit 2, nothing run).
Finished runs are skipped, so a killed sweep restarts where it stopped; a finished run with targets not yet
evaluated is only evaluated on those (no retraining); a run another process holds is left to it ("running
elsewhere"); a finished run with other settings where a run would go is an error. ``--jobs 1``: in this
process; ``--jobs N``: N ``main.py`` processes, one GPU each (on CPU, the cores shared out), logs in
``OUTPUT_DIR/sweep_logs/``; ``--slurm FILE``: an sbatch array.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
if str(REPO) not in sys.path:  # run as a script: the repository's packages (and scripts.sweep_plan) importable
    sys.path.insert(0, str(REPO))
from scripts.sweep_plan import PROTOCOLS, Run, SweepError, is_complete, missing_targets, plan, standing  # noqa: E402

__all__ = ["MAIN", "Run", "SweepError", "build_parser", "main", "run_in_process", "run_in_processes", "write_slurm"]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    words = "space- or comma-separated, quoted or as several words"
    parser = OneLineParser(
        prog="scripts/sweep.sh", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Finished runs are skipped: run the same command again to continue a killed sweep. "
               "After the options, '--' passes the rest to every main.py run, e.g. -- --n_iters 2 --set precision=fp32. "
               "Examples: scripts/sweep.sh --root_path DATA --methods nora --datasets dtd --shots 4 "
               "--grid lr=1e-3,5e-4 --grid method_options.inner_rank=8,16; "
               "scripts/sweep.sh --root_path DATA --protocol base2new --methods \"lora nora aira\"; "
               "scripts/sweep.sh --root_path DATA --table 2; "
               "scripts/sweep.sh --root_path DATA --protocol cross_dataset (then --protocol domain: the same runs)")
    parser.add_argument("--root_path", required=True, help="folder holding the datasets (DATASET.md)")
    parser.add_argument("--methods", nargs="+", metavar="M", help=f"methods ({words}; default: every registered one)")
    parser.add_argument("--table", choices=["2"], help="plan a paper's table: 2 = the NoRA paper's Table 2, each of "
                        "its rows and ours beside them whose method is registered here (others skipped with a "
                        "warning; lora_zoo/paper_table.py) x food101, oxford_pets, dtd x shots 4 16 x seeds 1 2 3; "
                        "--methods, --datasets and --shots narrow it")
    parser.add_argument("--datasets", nargs="+", metavar="D",
                        help=f"datasets ({words}; default: every benchmark dataset found under --root_path)")
    parser.add_argument("--protocol", default="fewshot", choices=PROTOCOLS,
                        help="default fewshot; base2new trains on the base half of the "
                             "classes and tests on base and new; cross_dataset trains on --source and evaluates each "
                             "run on every other benchmark found; domain, on the ImageNet variants found")
    parser.add_argument("--source", metavar="D", help="cross_dataset and domain: the dataset the runs train on "
                                                      "(default imagenet)")
    parser.add_argument("--eval_on", nargs="+", metavar="D",
                        help=f"datasets every run is evaluated on ({words}; default: cross_dataset, every other "
                             "benchmark found; domain, the ImageNet variants found)")
    parser.add_argument("--shots", nargs="+", metavar="K",
                        help="shots (default 1 2 4 8 16; 16 for base2new, cross_dataset, domain)")
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


def visible_gpus() -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` if set (empty: none), else one entry per GPU ``nvidia-smi -L`` lists (none: CPU)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # "": GPUs hidden on purpose
        return [gpu for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    if shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(i) for i in range(sum(line.startswith("GPU") for line in listing.splitlines()))]
    return []


def evaluation_only(run: Run) -> list[str]:
    """The targets a trained run still misses (it is only evaluated on them), else nothing."""
    from lora_zoo.runs import is_finished
    return missing_targets(run) if is_finished(run.folder) else []


def start_text(run: Run, missing: list[str]) -> str:
    return f"start {run.label}" + (f" (trained: evaluating on {', '.join(missing)})" if missing else "")


def ran_elsewhere(run: Run, elsewhere) -> None:
    """A run that ended well but left work undone was claimed by another process meanwhile: say so, count it."""
    if elsewhere is not None and not is_complete(run):
        elsewhere.append(run)
        print(f"sweep: running elsewhere {run.label} (claimed by another process; not run here)", file=sys.stderr,
              flush=True)


def run_in_process(pending: list[Run], elsewhere: list | None = None) -> int:
    """Each run through ``main.py``'s ``run`` in this process; returns the number that failed (``elsewhere``
    collects those another process held)."""
    from lora_zoo.cli import run as run_main

    failed = 0
    for run in pending:
        print(f"sweep: {start_text(run, evaluation_only(run))}", file=sys.stderr, flush=True)
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
        else:
            ran_elsewhere(run, elsewhere)
    return failed


def run_in_processes(pending: list[Run], jobs: int, log_dir: Path, elsewhere: list | None = None) -> int:
    """``jobs`` main.py processes at once, one GPU each (on CPU, CPUs // jobs threads each); returns the number
    that failed (``elsewhere`` collects those another process held). An evaluation-only pass logs to its own
    ``.eval_on.out`` beside the training's ``.out``."""
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
                missing = evaluation_only(run)
                log = log_dir / ("_".join(run.folder.relative_to(run.output_dir).parts)
                                 + (".eval_on.out" if missing else ".out"))
                print(f"sweep: {start_text(run, missing)} (log {log})", file=sys.stderr, flush=True)
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
                    else:
                        ran_elsewhere(run, elsewhere)
    finally:
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
    return failed


def write_slurm(pending: list[Run], path: Path, header: str, log_dir: Path) -> None:
    """An sbatch job array, one task per pending run; a task whose run has finished meanwhile (and is evaluated on
    every target) exits at once."""
    finished = ("import sys; from lora_zoo.runs import is_finished, target_file; folder = sys.argv[1]; "
                "sys.exit(0 if is_finished(folder) and all(target_file(folder, t).is_file() for t in sys.argv[2:]) "
                "else 1)")
    targets = "".join(f" {shlex.quote(target)}" for target in pending[0].targets)  # one list for the whole sweep
    lines = ["#!/usr/bin/env bash", "#SBATCH --job-name=lora_zoo_sweep", f"#SBATCH --array=0-{len(pending) - 1}",
             "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", f"#SBATCH --output={log_dir}/%A_%a.out",
             *([header] if header else []),
             "# generated by scripts/sweep.sh: one array task per pending run", "set -euo pipefail",
             f"cd {shlex.quote(os.getcwd())}", "RUNS=("]
    lines += [f"  {shlex.quote(shlex.join(run.argv))}" for run in pending] + [")", "FOLDERS=("]
    lines += [f"  {shlex.quote(str(run.folder))}" for run in pending] + [")"]
    python = shlex.quote(sys.executable)
    lines += ['folder="${FOLDERS[$SLURM_ARRAY_TASK_ID]}"',
              f'if PYTHONPATH={shlex.quote(str(REPO))} {python} -c {shlex.quote(finished)} "$folder"{targets}; then',
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

    try:
        where = standing(runs)
    except ValueError as err:  # a finished run with other settings where this sweep would write
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    pending, targets = where.pending, runs[0].targets
    if targets:
        print(f"sweep: each run evaluated on {', '.join(targets)}", file=sys.stderr)
    print(f"sweep: {where.summary()}", file=sys.stderr)
    for run, holder in where.elsewhere:
        print(f"sweep: running elsewhere {run.label} ({holder.describe()}); not run here", file=sys.stderr)
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
    elsewhere = [run for run, _ in where.elsewhere]
    try:
        with sigterm_as_interrupt():  # a kill stops the sweep the way Ctrl-C does
            failed = (run_in_process(pending, elsewhere) if args.jobs == 1
                      else run_in_processes(pending, args.jobs, log_dir, elsewhere))
    except KeyboardInterrupt:
        print("sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    left = f"; {len(elsewhere)} running elsewhere, not run here" if elsewhere else ""
    if failed:
        print(f"sweep: {failed} of {len(pending)} runs failed{left}", file=sys.stderr)
        return 1
    print(f"sweep: done{left}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
