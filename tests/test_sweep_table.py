"""scripts/sweep.sh (kill and restart, Slurm array) and scripts/make_table.py (Table 2 layout, mean ± std)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "scripts" / "sweep.sh"
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread, no OpenMP spinning on shared cores


def sweep_args(data_root, out, *extra):
    return ["bash", str(SWEEP), "--root_path", str(data_root), "--output_dir", str(out), "--backbone", "tiny-vit",
            "--methods", "lora", "--datasets", "dtd", "--shots", "1 2", "--seeds", "1 2", "--python", sys.executable,
            *extra, "--", "--n_iters", "100", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16"]


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sweep_killed_midway_then_restarted_completes_once(data_root, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.Popen(sweep_args(data_root, out), cwd=tmp_path, start_new_session=True, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: len(list(out.rglob("result.json"))) == 1), "first run never finished"
        started = lambda: [p for p in out.rglob("train.log") if not (p.parent / "result.json").exists()]
        assert wait_for(lambda: bool(started())), "second run never started"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    killed = started()
    assert len(finished) == 1 and len(killed) == 1, (finished, killed)  # the killed run left no result.json
    time.sleep(0.05)
    restart = subprocess.run(sweep_args(data_root, out), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=ENV)
    assert restart.returncode == 0, restart.stderr
    assert "4 runs, 1 finished, 3 to do" in restart.stderr
    results = sorted(out.rglob("result.json"))
    assert len(results) == 4
    seen = {(r["shots"], r["seed"], r["method"]) for r in (json.loads(p.read_text()) for p in results)}
    assert seen == {(1, 1, "lora"), (1, 2, "lora"), (2, 1, "lora"), (2, 2, "lora")}
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime  # not rerun
    assert (killed[0].parent / "result.json").is_file()
    assert not list(out.rglob("*.tmp"))  # no half-written files left behind
    again = subprocess.run(sweep_args(data_root, out), cwd=tmp_path, capture_output=True, text=True, timeout=60, env=ENV)
    assert again.returncode == 0 and "4 finished, 0 to do" in again.stderr


def test_slurm_writes_an_array_script_for_pending_runs(data_root, tmp_path):
    out, script = tmp_path / "results", tmp_path / "jobs" / "sweep.sbatch"
    done = out / "tiny-vit" / "dtd" / "1shots" / "seed1" / "lora" / "result.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    proc = subprocess.run(sweep_args(data_root, out, "--slurm", str(script), "--slurm_header", "#SBATCH --partition=gpu"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "#SBATCH --array=0-2\n" in text and "#SBATCH --partition=gpu" in text  # 4 runs, 1 finished
    assert text.count("--method\\ lora") == 3 and "SLURM_ARRAY_TASK_ID" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not list(out.rglob("train.log"))  # nothing was run


def write_result(root, method, dataset, shots, seed, accuracy, backbone="ViT-B-16"):
    folder = root / backbone / dataset / f"{shots}shots" / f"seed{seed}" / method
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"backbone": backbone, "method": method, "dataset": dataset, "shots": shots, "seed": seed, "accuracy": accuracy}))


@pytest.fixture
def fixture_results(tmp_path):
    root = tmp_path / "results"
    for seed, acc in zip((1, 2, 3), (79.0, 80.0, 81.0)):
        write_result(root, "nora", "dtd", 4, seed, acc)        # 80.00 ± 1.00 (sample std)
    for seed, acc in zip((1, 2), (70.0, 72.0)):
        write_result(root, "nora", "food101", 4, seed, acc)    # 71.00 ± 1.41, 2 of 3 seeds; pets missing
    for seed, (food, pets, dtd) in zip((1, 2, 3), ((80, 90, 70), (82, 90, 71), (84, 90, 72))):
        for dataset, acc in (("food101", food), ("oxford_pets", pets), ("dtd", dtd)):
            write_result(root, "lora", dataset, 16, seed, float(acc))  # per-seed averages 80, 81, 82
    return root


def make_table(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_table.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def rows_by_name(csv_text):
    rows = [row for row in csv.reader(StringIO(csv_text)) if row]
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


def test_table_mean_std_and_missing_runs(fixture_results):
    proc = make_table(fixture_results, "--format", "csv", "--no_reported", "--datasets", "food101", "oxford_pets",
                      "dtd")
    assert proc.returncode == 0, proc.stderr
    header, rows = rows_by_name(proc.stdout.split("\n\n", 1)[1])
    assert header == ["Method", "Food 4-shot", "Pets 4-shot", "DTD 4-shot", "Average 4-shot",
                      "Food 16-shot", "Pets 16-shot", "DTD 16-shot", "Average 16-shot"]
    assert rows["NoRA (ours, nora)"] == ["71.00 ± 1.41 (2/3)", "—", "80.00 ± 1.00", "—", "—", "—", "—", "—"]
    assert rows["CLIP-LoRA (ours, lora)"] == ["—", "—", "—", "—", "82.00 ± 2.00", "90.00 ± 0.00", "71.00 ± 1.00",
                                              "81.00 ± 1.00"]


def test_table_shows_reported_rows_in_every_format(fixture_results, tmp_path):
    reported = tmp_path / "reported.csv"
    reported.write_text("# comment\nmethod,shots,food101,oxford_pets,dtd,average\nNoRA,4,87.1,93.1,65.2,81.8\n"
                        "NoRA,16,87.8,94.1,74.3,85.4\nCLIP-LoRA,16,84.2,92.4,72.0,82.9\n")
    proc = make_table(fixture_results, "--reported", reported)
    assert proc.returncode == 0, proc.stderr
    md, latex, table_csv = proc.stdout.strip().split("\n\n")[1:]
    assert "| NoRA (paper) | 87.1 | 93.1 | 65.2 | 81.8 | 87.8 | 94.1 | 74.3 | 85.4 |" in md
    assert "| CLIP-LoRA (paper) | — | — | — | — | 84.2 | 92.4 | 72.0 | 82.9 |" in md
    assert "| NoRA (ours, nora) | 71.00 ± 1.41 (2/3) | — | 80.00 ± 1.00 | — |" in md
    assert r"80.00 $\pm$ 1.00" in latex and r"\begin{tabular}" in latex and r"\end{tabular}" in latex
    _, rows = rows_by_name(table_csv)
    assert rows["NoRA (paper)"][2] == "65.2" and rows["NoRA (ours, nora)"][2] == "80.00 ± 1.00"


def test_default_reported_file_and_plot_skip_message(fixture_results, tmp_path):
    proc = make_table(fixture_results, "--format", "md", "--plot_dir", tmp_path / "plots")
    assert proc.returncode == 0, proc.stderr
    assert "| NoRA (paper) | 87.1 | 93.1 | 65.2 | 81.8 |" in proc.stdout  # reported/nora_table2.csv, shipped
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "plots" / "shots_dtd.png").is_file()
    except ImportError:
        assert "matplotlib is not installed" in proc.stderr


def test_sweep_defaults_to_every_registered_method(tmp_path):
    import lora_zoo
    proc = subprocess.run(["bash", str(SWEEP), "--root_path", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                           "--datasets", "dtd", "--shots", "4", "--seeds", "1", "--python", sys.executable,
                           "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    planned = [line.split("--method ")[1].split()[0] for line in proc.stdout.splitlines() if "--method" in line]
    assert planned == lora_zoo.list_methods()
