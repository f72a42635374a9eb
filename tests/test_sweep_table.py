"""scripts/sweep.py (and its sweep.sh wrapper): a real tiny grid sweep tabulated by make_table, resuming,
validation before anything runs, parallel processes, Slurm arrays.

Runs use the tiny-vit backbone on the synthetic DTD of conftest.py, 2 iterations each, mostly in this
process (``--jobs 1`` calls ``main.run``), so the whole file takes seconds, not minutes.
"""
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest

from scripts import make_table, sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP_SH = REPO / "scripts" / "sweep.sh"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # tiny models: no OpenMP spinning on shared cores
RUN_ARGS = ["--n_iters", "2", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16"]
GRID = ["--grid", "lr=0.01,0.1", "--grid", "method_options.rank=2,8"]


def sweep_args(data_root, out, *options, run_args=RUN_ARGS):
    return ["--root_path", str(data_root), "--output_dir", str(out), "--backbone", "tiny-vit", "--methods", "lora",
            "--datasets", "dtd", "--shots", "1", *options, "--", *run_args]


def results(out):
    """``{(lr, rank, seed): result}`` of every result.json under ``out``."""
    found = {}
    for path in out.rglob("result.json"):
        r = json.loads(path.read_text())
        found[r["config"]["train"]["lr"], r["method_config"]["rank"], r["seed"]] = r
    return found


@pytest.fixture(scope="module")
def grid_sweep(data_root, tmp_path_factory):
    """2 options × 2 values × 2 seeds of lora, run in this process."""
    out = tmp_path_factory.mktemp("grid") / "results"
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1 2", *GRID)) == 0
    return out


def test_each_grid_point_is_its_own_readable_run_folder(grid_sweep):
    folders = sorted(p.name for p in (grid_sweep / "tiny-vit" / "dtd" / "1shots" / "seed1").iterdir())
    assert folders == ["lora-lr=0.01_rank=2", "lora-lr=0.01_rank=8", "lora-lr=0.1_rank=2", "lora-lr=0.1_rank=8"]
    found = results(grid_sweep)
    assert sorted(found) == [(lr, rank, seed) for lr in (0.01, 0.1) for rank in (2, 8) for seed in (1, 2)]
    for (lr, rank, seed), r in found.items():
        assert r["config"]["run_name"] == f"lr={lr}_rank={rank}" and r["config"]["train"]["n_iters"] == 2
        assert r["trainable_params"] == {2: 3072, 8: 12288}[rank]  # the option reached the adapters


def csv_table(capsys, *args):
    assert make_table.main([str(a) for a in args] + ["--format", "csv"]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    rows = [row for row in csv.reader(StringIO(blocks[1])) if row]
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


def expected_cell(found, lr, rank):
    accuracies = [found[lr, rank, seed]["accuracy"] for seed in (1, 2)]
    return f"{statistics.fmean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}"


def test_table_cells_are_the_hand_computed_means_for_either_key_as_rows(capsys, grid_sweep):
    found = results(grid_sweep)
    cells = {(lr, rank): expected_cell(found, lr, rank) for lr in (0.01, 0.1) for rank in (2, 8)}
    assert len(set(cells.values())) > 1, "the grid points should not all score the same"
    header, rows = csv_table(capsys, grid_sweep, "--rows", "lr", "--cols", "method_options.rank")
    assert header == ["Method", "rank=2 1-shot", "rank=8 1-shot"]
    assert rows == {f"CLIP-LoRA (ours, lora): lr={lr}": [cells[lr, 2], cells[lr, 8]] for lr in (0.01, 0.1)}
    header, rows = csv_table(capsys, grid_sweep, "--rows", "rank", "--cols", "lr")
    assert header == ["Method", "lr=0.01 1-shot", "lr=0.1 1-shot"]
    assert rows == {f"CLIP-LoRA (ours, lora): rank={rank}": [cells[0.01, rank], cells[0.1, rank]] for rank in (2, 8)}
    header, rows = csv_table(capsys, grid_sweep, "--rows", "lr")  # datasets as columns: one row per grid point
    assert header == ["Method", "DTD 1-shot", "Average 1-shot"]
    zero_shot = rows.pop("Zero-shot (random init, no training)")  # tiny-vit: pretrained null
    assert {r["zero_shot_accuracy"] for r in found.values()} == {float(zero_shot[0])} and zero_shot[1] == zero_shot[0]
    assert list(rows) == [f"CLIP-LoRA (ours, lora): lr={lr}, rank={rank}" for lr in (0.01, 0.1) for rank in (2, 8)]
    assert [cells for cells in rows.values()] == [[cells[key]] * 2 for key in sorted(cells)]


def test_best_over_picks_the_best_mean_per_cell_beside_the_fixed_rows(capsys, grid_sweep):
    found = results(grid_sweep)
    _, rows = csv_table(capsys, grid_sweep, "--rows", "rank", "--best_over", "lr")
    for rank in (2, 8):
        means = {lr: statistics.fmean(found[lr, rank, s]["accuracy"] for s in (1, 2)) for lr in (0.01, 0.1)}
        best = max(means, key=lambda lr: (means[lr], -lr))  # a tie goes to the first value
        label = f"best lr per cell, selected on the test split: CLIP-LoRA (ours, lora): rank={rank}"
        assert rows[label][0] == f"{expected_cell(found, best, rank)} (lr={best})"
        assert f"CLIP-LoRA (ours, lora): rank={rank}, lr={best}" in rows


def test_restart_reruns_only_unfinished_runs(capsys, data_root, grid_sweep, tmp_path):
    out = tmp_path / "results"
    shutil.copytree(grid_sweep, out)
    removed = next(out.rglob("lora-lr=0.1_rank=8/result.json"))
    before = json.loads(removed.read_text())
    removed.write_text(removed.read_text()[:40])  # truncated: as if killed while writing (it never is: atomic)
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("result.json") if p != removed}
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1 2", *GRID)) == 0
    assert "sweep: 8 runs, 7 finished, 1 to do" in capsys.readouterr().err
    after = json.loads(removed.read_text())
    assert after["accuracy"] == before["accuracy"] and after["final_loss"] == before["final_loss"]  # same run again
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # not rerun
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1 2", *GRID)) == 0
    assert "sweep: 8 runs, 8 finished, 0 to do" in capsys.readouterr().err


def test_finished_runs_with_other_settings_are_refused_not_skipped(capsys, data_root, grid_sweep, tmp_path):
    out = tmp_path / "results"
    shutil.copytree(grid_sweep, out)
    # the same grid under other loop settings would land in the same folders: refused, nothing overwritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    other = RUN_ARGS[:1] + ["3"] + RUN_ARGS[2:]  # --n_iters 3
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1 2", *GRID, run_args=other)) == 2
    err = capsys.readouterr().err
    assert "is a finished run with other settings (n_iters: 2 there, 3 now); give --run_name NAME" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    # a preset's run name leads each grid point's: its runs sit beside the others
    preset = tmp_path / "preset.yaml"
    preset.write_text("run_name: mine\nn_iters: 3\n")
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1", "--grid", "lr=0.01", "--config", str(preset),
                                 "--dry_run")) == 0
    assert "--run_name mine-lr=0.01" in capsys.readouterr().out


@pytest.mark.parametrize("options, run_args, expect", [
    (["--methods", "lora foo"], RUN_ARGS, "unknown method 'foo' (registered: "),
    (["--datasets", "dtd,no_such"], RUN_ARGS, "--datasets no_such: unknown dataset 'no_such'"),
    (["--datasets", "food101"], RUN_ARGS, "--datasets food101: dataset folder not found: "),
    (["--shots", "4 x"], RUN_ARGS, "--shots expects integers, got 'x'"),
    (["--methods", " "], RUN_ARGS, "--methods needs at least one value"),
    (["--seeds", "1.5"], RUN_ARGS, "--seeds expects integers, got '1.5'"),
    (["--jobs", "0"], RUN_ARGS, "--jobs must be a positive integer, got 0"),
    (["--grid", "no_such_key=1,2"], RUN_ARGS, "unknown config key 'no_such_key'"),
    (["--grid", "lr"], RUN_ARGS, "--grid expects KEY=V1,V2,..., got 'lr'"),
    (["--grid", "shots=1,2"], RUN_ARGS, "--grid shots: set shots with the sweep's own option"),
    (["--grid", "method_options.rank=2,two"], RUN_ARGS, "lora dtd 1-shot seed 1 [rank=two]: rank must be an integer"),
    (["--grid", "lr=0.01"], RUN_ARGS + ["--run_name", "x"], "--run_name after '--' cannot be combined with --grid"),
    (["--backbone", "ViT-Z-99"], RUN_ARGS, "unknown backbone 'ViT-Z-99'"),
    ([], ["--n_iters", "many"], "n_iters must be an integer or null, got 'many'"),
    (["--no_such_option"], RUN_ARGS, "unrecognized arguments: --no_such_option (see --help)"),
])
def test_bad_requests_are_one_line_and_run_nothing(capsys, data_root, tmp_path, options, run_args, expect):
    out = tmp_path / "results"
    assert sweep.main(sweep_args(data_root, out, *options, run_args=run_args)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("sweep: error: ") and expect in captured.err, captured.err
    assert not out.exists()


def test_dry_run_plans_every_registered_method_on_every_benchmark_dataset_found(capsys, data_root, tmp_path):
    import lora_zoo
    assert sweep.main(["--root_path", str(data_root), "--output_dir", str(tmp_path / "o"), "--shots", "4",
                       "--seeds", "1", "--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "sweep: " + f"{len(lora_zoo.list_methods())} runs, 0 finished" in captured.err
    planned = [line.split() for line in captured.out.splitlines()]
    assert [args[args.index("--method") + 1] for args in planned] == lora_zoo.list_methods()
    assert {args[args.index("--dataset") + 1] for args in planned} == {"dtd"}  # the only dataset under data_root
    assert not (tmp_path / "o").exists()


def test_slurm_array_lists_the_pending_runs(capsys, data_root, grid_sweep, tmp_path):
    out, script = tmp_path / "results", tmp_path / "jobs" / "sweep.sbatch"
    shutil.copytree(grid_sweep, out)
    for path in list(out.rglob("seed2/*/result.json"))[:3]:
        path.unlink()
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1 2", *GRID, "--slurm", str(script),
                                 "--slurm_header", "#SBATCH --partition=gpu")) == 0
    assert "8 runs, 5 finished, 3 to do" in capsys.readouterr().err
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "#SBATCH --array=0-2\n" in text and "#SBATCH --partition=gpu\n" in text
    assert text.count("--method lora --dataset dtd --shots 1 --seed 2") == 3 and "SLURM_ARRAY_TASK_ID" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert len(list(out.rglob("result.json"))) == 5  # nothing ran


def test_sweep_sh_from_another_folder_stops_on_kill_and_leaves_no_result(data_root, tmp_path):
    args = sweep_args(data_root, "results", "--seeds", "1", run_args=RUN_ARGS[2:] + ["--n_iters", "5000"])
    proc = subprocess.Popen(["bash", str(SWEEP_SH), "--python", sys.executable, *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "results").rglob("train.log")) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the run trains 5000 iterations: it is mid-run
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "error: interrupted before the run finished (no result.json)" in err and "sweep: interrupted; run the same" in err
    assert list((tmp_path / "results").rglob("train.log")) and not list(tmp_path.rglob("result.json"))


def test_jobs_run_in_processes_with_logs_and_match_the_in_process_run(capsys, data_root, grid_sweep, tmp_path):
    out = tmp_path / "results"
    assert sweep.main(sweep_args(data_root, out, "--seeds", "1", "--grid", "lr=0.1", "--jobs", "2")) == 0
    assert "sweep: 1 runs, 0 finished, 1 to do" in capsys.readouterr().err
    log = out / "sweep_logs" / "tiny-vit_dtd_1shots_seed1_lora-lr=0.1.out"
    assert "lora dtd 1-shot seed 1 (tiny-vit)" in log.read_text()  # main.py --quiet prints its summary
    (key, r), = results(out).items()
    reference = results(grid_sweep)[0.1, 2, 1]  # rank 2 is lora's default: the same run as in-process
    assert key == (0.1, 2, 1) and (r["accuracy"], r["final_loss"]) == (reference["accuracy"], reference["final_loss"])


FAKE_MAIN = """import os, sys, time
print("pid", os.getpid(), "gpu", os.environ.get("CUDA_VISIBLE_DEVICES"), "args", *sys.argv[1:], flush=True)
time.sleep(float(sys.argv[2]))
sys.exit(1 if sys.argv[1] == "fail" else 0)
"""


def test_process_pool_one_gpu_per_job_counts_failures_and_stops_children_on_interrupt(tmp_path, monkeypatch):
    fake = tmp_path / "fake_main.py"
    fake.write_text(FAKE_MAIN)
    monkeypatch.setattr(sweep, "MAIN", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    logs = tmp_path / "logs"
    runs = [sweep.Run([outcome, seconds], tmp_path / f"out/b/d/1shots/seed1/run{i}", tmp_path / "out", f"run {i}")
            for i, (outcome, seconds) in enumerate([("ok", "0.5"), ("fail", "0"), ("ok", "0")])]
    assert sweep.run_in_processes(runs, 2, logs) == 1
    log = lambda i: (logs / f"b_d_1shots_seed1_run{i}.out").read_text().split()  # pid N gpu G args ...
    assert log(0)[3] == "3" and log(1)[3] == "5" and log(2)[3] == "5"  # run 2 takes the slot run 1 freed
    real_sleep, started = time.sleep, []

    def interrupt_once_both_started(seconds):  # the pool polls with time.sleep: Ctrl-C arrives there
        real_sleep(seconds)
        started[:] = [words[1] for words in map(log, (0, 1)) if words]
        if len(started) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(time, "sleep", interrupt_once_both_started)
    slow = [sweep.Run(["ok", "600"], run.folder, run.output_dir, run.label) for run in runs[:2]]
    with pytest.raises(KeyboardInterrupt):
        sweep.run_in_processes(slow, 2, logs)
    for pid in started:
        with pytest.raises(ProcessLookupError):  # terminated and reaped
            os.kill(int(pid), 0)


def test_wrapper_prefers_the_repository_venv_then_python_env(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SWEEP_SH, tmp_path / "scripts" / "sweep.sh")
    shutil.copy(SWEEP_SH.with_name("find_python.sh"), tmp_path / "scripts")  # the lookup the wrappers share
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "venv python $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in ENV.items() if k != "PYTHON"}
    run = lambda **extra: subprocess.run(["bash", str(tmp_path / "scripts" / "sweep.sh"), "--shots", "4 x"],
                                         env={**env, **extra}, capture_output=True, text=True, timeout=30)
    assert run().stdout == f"venv python {tmp_path}/scripts/sweep.py --shots 4 x\n"
    missing = run(PYTHON=str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith(f"sweep.sh: error: no Python at {tmp_path}/nowhere")
    proc = subprocess.run(["bash", str(SWEEP_SH), "--help"], env={**env, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: scripts/sweep.sh [-h] --root_path ROOT_PATH")
