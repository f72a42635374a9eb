"""scripts/gpu_check.sh --tiny --device cpu: the GPU check's tables have every row and column, with numbers that
parse, are positive and follow from the setup; bad input is refused before anything runs."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_zoo as lz

REPO = Path(__file__).resolve().parents[1]
LEVEL = 1 / 255 / 0.26130258  # one level of 255 after normalisation, at the smallest OpenAI std


def run_check(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each markdown table of ``text`` as (header cells, rows of cells)."""
    found, lines = [], text.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("|---"):
            header = [c.strip() for c in lines[number - 1].strip("|").split("|")]
            rows = []
            for row in lines[number + 1:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            found.append((header, rows))
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "table.md"
    proc = run_check("--tiny", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out.read_text()


def test_tiny_check_prints_and_writes_the_same_tables(tiny):
    proc, written = tiny
    assert proc.stdout.strip() == written.strip()
    assert written.startswith("# GPU check: CPU (cpu)") and "tiny-vit random init, batch 4, 32 px" in written
    assert [header for header, _ in tables(written)] == [
        ["method", "step ms", "× frozen", "images/s", "peak MiB", "skipped steps"],
        ["pipeline", "wall s", "train s", "iterations", "test images", "top-1 %", "× ours (first run)"],
        ["method", "prompts", "step ms", "peak MiB"],
        ["path", "images/s", "max abs diff vs PIL (normalised)"]]


def printed(text: str) -> tuple[float, float]:
    """The interval a number printed rounded to its last digit stands for."""
    half = 0.5 * 10.0 ** -(len(text.split(".")[1]) if "." in text else 0)
    return number(text) - half, number(text) + half


def test_every_method_has_a_step_row_against_the_frozen_model(tiny):
    methods, rows = tables(tiny[1])[0][0], tables(tiny[1])[0][1]
    assert [row[0] for row in rows] == ["frozen (no optimizer step)"] + lz.list_methods()
    frozen = printed(rows[0][1])
    assert rows[0][2] == "1.00" and rows[0][5] == "—"
    for name, step_ms, vs_frozen, per_second, peak, skipped in rows:
        assert number(step_ms) > 0 and number(peak) > 0
        # each figure printed rounded (a head's step is a millisecond or two: its last digit is a few percent)
        step, ratio, rate = printed(step_ms), printed(vs_frozen), printed(per_second)
        assert step[0] / frozen[1] <= ratio[1] and ratio[0] <= step[1] / frozen[0]
        assert 4000 / step[1] <= rate[1] and rate[0] <= 4000 / step[0]  # batch 4
        if name != "frozen (no optimizer step)":
            done, total = map(int, re.fullmatch(r"(\d+)/(\d+)", skipped).groups())
            assert total == 4 and done == 0  # fp32 on the CPU: the scaler is off and skips nothing


def test_end_to_end_runs_both_pipelines_on_the_same_split(tiny):
    _, rows = tables(tiny[1])[1]
    assert [row[0].split(":")[0] for row in rows] == ["ours", "ours", "reference"]
    first = number(rows[0][1])
    for _, wall, train, iterations, test_images, accuracy, ratio in rows:
        assert number(wall) > number(train) > 0
        assert iterations == "4" and test_images == "12"  # 2 shots x 2 iterations a shot; 4 classes x 3
        assert 0 <= number(accuracy) <= 100
        assert number(ratio) == pytest.approx(number(wall) / first, abs=0.01, rel=0.05)
    match = re.search(r"Reference / ours: ([\d.]+)× \(first run\), ([\d.]+)× \(next run of a sweep\)", tiny[1])
    assert match and number(match.group(1)) == pytest.approx(number(rows[2][1]) / first, abs=0.01, rel=0.05)


def test_many_prompt_step_and_device_augmentation_rows(tiny):
    _, prompts = tables(tiny[1])[2]
    assert [row[:2] for row in prompts] == [["lora", "100"], ["nora", "100"], ["aira", "100"]]
    assert all(number(row[2]) > 0 and number(row[3]) > 0 for row in prompts)
    _, augment = tables(tiny[1])[3]
    assert [row[0].split(":")[0] for row in augment] == ["PIL path", "device path on cpu"]
    assert all(number(row[1]) > 0 for row in augment)
    assert 0 < number(augment[1][2]) <= 2 * LEVEL + 1e-4  # interpolation differs by at most two levels
    assert "Labels identical: True." in tiny[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--prompt_methods", "lora", "nope"], "unknown method nope"),
    (["--skip_steps", "2"], "--skip_steps must be >= --warmup + --timed (3)"),
    (["--out", "{tmp}/missing/table.md"], "expected a file in an existing folder"),
])
def test_bad_input_is_refused_before_anything_runs(gpu_check, args, message, tmp_path, capsys):
    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [arg.format(tmp=tmp_path) for arg in args]
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--tiny", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert gpu_check.parse_args(["--tiny", "--batch", "8"]).batch == 8  # an explicit flag beats --tiny's value
