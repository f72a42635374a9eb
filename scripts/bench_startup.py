"""Startup time of the command-line tools: wall time of each command in a fresh interpreter, side by side.

Each command runs as its own process, from the checkout's root, one after another (never in parallel):
a warm-up round that is not timed (it also compiles the checkout's ``.pyc`` files), then ``--reps``
rounds in which every checkout runs every command in turn, so that a change in the machine's load
reaches all columns alike; the table gives the median. Every run is checked, not only timed: a help
command must exit 0 and print its usage, and the offline-weights command (``main.py --method lora`` on
a tiny synthetic DTD, with the Hugging Face cache pointed at an empty folder and ``HF_HUB_OFFLINE=1``)
must exit 1 with the one-line "no ViT-B-16 weights" error alone on stderr and write nothing. Where
``huggingface.co`` can be reached that command does not stop there, and its row reports the failure.

Targets (issue 19, "tools start at once"): ``make_table``, ``datasets.check`` and the sweep's
``--help`` within 1 s of ``python -c pass``; ``main.py --help`` (with or without a method) at most
the ``import torch`` time + 1 s (the method list comes from the registry, whose modules are torch
code). Building a run's configuration checks the backbone name against open_clip's model list, so
the sweep's planning and the offline-weights error are held to the ``import open_clip`` time + 1 s.

    python scripts/bench_startup.py                                  # this checkout, median of 5
    python scripts/bench_startup.py --repo /tmp/before --json s.json # and another checkout beside it
    python scripts/bench_startup.py --reps 1 --commands make_table datasets_check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_ERROR = r"error: no ViT-B-16 weights 'openai' in .* cannot be reached: .*"


@dataclass(frozen=True)
class Command:
    name: str
    shown: str                      # as the table spells it
    args: tuple[str, ...]           # after the Python executable; {data} and {out} are filled per run
    reference: Optional[str] = None  # the command whose time + ALLOWANCE_S is the target
    exit_code: int = 0
    usage: bool = False             # stdout must hold argparse's usage line
    error_line: Optional[str] = None  # stderr must be exactly this one line (a regex), and {out} stay unwritten


ALLOWANCE_S = 1.0
SWEEP_PLAN = ("scripts/sweep.py", "--root_path", "{data}", "--methods", "lora", "--datasets", "dtd", "--shots", "1",
              "--seeds", "1", "--output_dir", "{out}", "--dry_run")
COMMANDS = (
    Command("pass", "python -c pass", ("-c", "pass")),
    Command("torch", 'python -c "import torch"', ("-c", "import torch")),
    Command("open_clip", 'python -c "import open_clip"', ("-c", "import open_clip")),
    Command("make_table", "scripts/make_table.py --help", ("scripts/make_table.py", "--help"), "pass", usage=True),
    Command("datasets_check", "python -m datasets.check --help", ("-m", "datasets.check", "--help"), "pass",
            usage=True),
    Command("sweep_help", "scripts/sweep.py --help", ("scripts/sweep.py", "--help"), "pass", usage=True),
    Command("main_help", "main.py --help", ("main.py", "--help"), "torch", usage=True),
    Command("main_nora_help", "main.py --method nora --help", ("main.py", "--method", "nora", "--help"), "torch",
            usage=True),
    Command("sweep_plan", "scripts/sweep.py --dry_run (1 run)", SWEEP_PLAN, "open_clip"),
    Command("offline_weights", "main.py --method lora (weights absent, offline)",
            ("main.py", "--method", "lora", "--root_path", "{data}", "--dataset", "dtd", "--output_dir", "{out}"),
            "open_clip", exit_code=1, error_line=WEIGHTS_ERROR),
)
BY_NAME = {command.name: command for command in COMMANDS}
NEEDS_DATA = ("sweep_plan", "offline_weights")


class BenchError(ValueError):
    """A bad request: one line, exit 2, nothing measured."""


def with_references(names: list[str]) -> list[Command]:
    """The commands asked for plus the ones their targets are measured against, in the table's order."""
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown command {unknown[0]!r}; expected some of: {', '.join(BY_NAME)}")
    wanted = set(names) | {BY_NAME[name].reference for name in names if BY_NAME[name].reference}
    return [command for command in COMMANDS if command.name in wanted]


def checkout_label(repo: Path) -> str:
    """``folder (commit)``, ``+`` after the commit when the work tree has changes."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return repo.name
    dirty = "+" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{repo.name} ({commit}{dirty})"


def check_checkout(path: str) -> Path:
    repo = Path(path).expanduser().resolve()
    files = ("main.py", "scripts/make_table.py", "datasets/check.py")
    missing = [name for name in files if not (repo / name).is_file()]
    if missing:
        raise BenchError(f"--repo {path}: not a lora_zoo checkout (no {missing[0]})")
    return repo


def outcome(command: Command, returncode: int, stdout: str, stderr: str, out: Path) -> Optional[str]:
    """None when the run did what the command promises, else a one-line reason."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode != command.exit_code:
        last = lines[-1][:200] if lines else "no output"
        return f"exit {returncode}, expected {command.exit_code}: {last}"
    if command.usage and not stdout.startswith("usage:"):
        return "no usage text on stdout"
    if command.error_line is not None:
        if len(lines) != 1 or not re.fullmatch(command.error_line, lines[0]):
            return f"stderr is not the one expected error line ({len(lines)} lines; last: {(lines or [''])[-1][:200]})"
        if out.exists():
            return f"wrote {out} though it stopped on an error"
    return None


def run_once(command: Command, repo: Path, python: str, data: Path, scratch: Path, env: dict) -> dict:
    """One timed run in a fresh interpreter: ``{"seconds", "cpu_seconds", "returncode", "failure"}`` (CPU time:
    user + system of the process and its children, less sensitive than wall time to other processes' load)."""
    out = Path(tempfile.mkdtemp(dir=scratch)) / "out"
    args = [arg.format(data=data, out=out) for arg in command.args]
    cpu_before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([python, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    seconds, cpu_after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "returncode": done.returncode,
            "failure": outcome(command, done.returncode, done.stdout, done.stderr, out)}


def prepare(scratch: Path, python: str) -> tuple[Path, dict]:
    """A tiny synthetic DTD (2 classes, enough images that no reader warns) and the environment of every run:
    the Hugging Face and XDG caches pointed at an empty folder, the hub client offline."""
    data, cache = scratch / "data", scratch / "empty_cache"
    cache.mkdir()
    done = subprocess.run([python, "-m", "datasets.synthetic", "--root", str(data), "--dataset", "dtd", "--num_classes",
                           "2", "--train_per_class", "16", "--val_per_class", "4", "--test_per_class", "2",
                           "--image_size", "8"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or "no output").splitlines()[-1]
        raise BenchError(f"cannot write the synthetic DTD with {python}: {last}")
    env = dict(os.environ, HF_HOME=str(cache), HF_HUB_CACHE=str(cache), XDG_CACHE_HOME=str(cache),
               HF_HUB_OFFLINE="1")
    return data, env


def measure(commands: list[Command], repos: list[Path], python: str, reps: int, warmup: int,
            log=lambda message: None) -> dict:
    """Every (checkout, command) pair: a list of timed runs; a command that fails once is not run again there."""
    runs = {(str(repo), c.name): [] for repo in repos for c in commands}
    failures: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        scratch = Path(tmp)
        data, env = prepare(scratch, python)
        for round_index in range(warmup + reps):
            timed = round_index >= warmup
            log(f"round {round_index + 1}/{warmup + reps}{'' if timed else ' (warm-up)'}")
            for repo in repos:
                for command in commands:
                    key = (str(repo), command.name)
                    if key in failures:
                        continue
                    run = run_once(command, repo, python, data, scratch, env)
                    if run["failure"]:
                        failures[key] = run["failure"]
                        log(f"{repo.name}: {command.shown}: {run['failure']}")
                    if timed or run["failure"]:
                        runs[key].append(run)
    return {"runs": runs, "failures": failures}


def summarise(commands: list[Command], repos: list[Path], measured: dict) -> list[dict]:
    """One row per command: per checkout the median seconds, the target and whether it is met."""
    medians = {key: statistics.median(r["seconds"] for r in runs) if runs else None
               for key, runs in measured["runs"].items()}
    rows = []
    for command in commands:
        row = {"command": command.name, "shown": command.shown, "reference": command.reference,
               "allowance_s": ALLOWANCE_S if command.reference else None, "checkouts": {}}
        for repo in repos:
            key = (str(repo), command.name)
            failure = measured["failures"].get(key)
            seconds = None if failure else medians[key]
            target = met = None
            if command.reference and seconds is not None:
                reference = None if (str(repo), command.reference) in measured["failures"] \
                    else medians[(str(repo), command.reference)]
                if reference is not None:
                    target = reference + ALLOWANCE_S
                    met = seconds <= target
            row["checkouts"][str(repo)] = {
                "seconds": seconds, "target_s": target, "met": met, "failure": failure,
                "returncodes": [r["returncode"] for r in measured["runs"][key]],
                "runs_s": [round(r["seconds"], 4) for r in measured["runs"][key]],
                "cpu_s": [round(r["cpu_seconds"], 4) for r in measured["runs"][key]]}
        rows.append(row)
    return rows


def markdown(rows: list[dict], repos: list[Path], labels: dict) -> str:
    head = "| command | target |" + "".join(f" {labels[str(repo)]} s | met |" for repo in repos)
    lines = [head, "|---|---|" + "---:|---|" * len(repos)]
    for row in rows:
        target = f"{row['reference']} + {row['allowance_s']:g} s" if row["reference"] else "—"
        cells = []
        for repo in repos:
            cell = row["checkouts"][str(repo)]
            if cell["failure"]:
                reason = cell["failure"].replace("|", "/")  # a bar would end the cell
                cells.append(f" failed: {reason} | no |")
                continue
            met = "—" if cell["met"] is None else f"{'yes' if cell['met'] else 'no'} (≤ {cell['target_s']:.2f})"
            cells.append(f" {cell['seconds']:.2f} | {met} |")
        lines.append(f"| `{row['shown']}` | {target} |" + "".join(cells))
    return "\n".join(lines)


def machine() -> dict:
    """Where and under what load it was measured."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "load_average_1_5_15": [round(x, 2) for x in load] if load else None}


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", action="append", default=[], metavar="DIR",
                        help="another lora_zoo checkout measured beside this one (repeatable; one column each)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter every command runs with "
                                                                   "(default: this one)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of each command per checkout (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compiles .pyc files)")
    parser.add_argument("--commands", nargs="+", default=[c.name for c in COMMANDS], metavar="NAME",
                        help="which commands (their targets' references are added): " + ", ".join(BY_NAME))
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        commands = with_references(args.commands)
        repos = [REPO] + [check_checkout(path) for path in args.repo]
        if shutil.which(args.python) is None:
            raise BenchError(f"--python {args.python}: no such interpreter")
    except BenchError as err:
        print(f"bench_startup: error: {err}", file=sys.stderr)
        return 2
    labels = {str(repo): checkout_label(repo) for repo in repos}
    before = machine()
    try:
        measured = measure(commands, repos, args.python, args.reps, args.warmup,
                           log=lambda message: print(message, file=sys.stderr, flush=True))
    except BenchError as err:
        print(f"bench_startup: error: {err}", file=sys.stderr)
        return 2
    rows = summarise(commands, repos, measured)
    after = machine()
    print(markdown(rows, repos, labels))
    print(f"\n{args.python}, median of {args.reps} runs per command (after {args.warmup} warm-up round(s)); "
          f"{before['cpus']} CPUs, load average {before['load_average_1_5_15']} before and "
          f"{after['load_average_1_5_15']} after")
    if args.json:
        result = {"python": args.python, "reps": args.reps, "warmup": args.warmup, "machine_before": before,
                  "machine_after": after, "checkouts": [{"path": str(r), "label": labels[str(r)]} for r in repos],
                  "rows": rows}
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if measured["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
