"""scripts/bench_startup.py: its table and figures parse, and each run is checked for what the command promises.

No timing is asserted here (the targets live in the benchmark's table): the tests check that the rows
are there, that the help commands exited 0, that a target is its reference's median + 1 s, and that
the offline-weights command of the benchmark really ends with the one-line weights error.
"""
import importlib.util
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_startup.py"
_spec = importlib.util.spec_from_file_location("bench_startup", SCRIPT)
bench = sys.modules["bench_startup"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(bench)

ROW = re.compile(r"\| `(?P<shown>[^`]+)` \| (?P<target>[^|]+) \| (?P<seconds>[0-9.]+) \| (?P<met>[^|]+) \|")


def run_bench(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_help_commands_table_and_json(tmp_path):
    out = tmp_path / "startup.json"
    proc = run_bench("--reps", "1", "--warmup", "0", "--commands", "make_table", "datasets_check", "sweep_help",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert header.startswith("| command | target |") and header.count(" s | met |") == 1  # one checkout
    rows = {m["shown"]: m for m in map(ROW.fullmatch, proc.stdout.splitlines()) if m}
    # the reference (python -c pass) is added by itself; torch is not asked for by any of these targets
    assert list(rows) == ["python -c pass", "scripts/make_table.py --help", "python -m datasets.check --help",
                          "scripts/sweep.py --help"]
    pass_s = float(rows["python -c pass"]["seconds"])
    assert rows["python -c pass"]["target"] == "—" and rows["python -c pass"]["met"] == "—"
    for shown in list(rows)[1:]:
        assert rows[shown]["target"] == "pass + 1 s"
        verdict, limit = re.fullmatch(r"(yes|no) \(≤ ([0-9.]+)\)", rows[shown]["met"]).groups()
        assert float(limit) == pytest.approx(pass_s + 1.0, abs=0.011)
        assert (verdict == "yes") == (float(rows[shown]["seconds"]) <= float(limit) + 0.005)
    result = json.loads(out.read_text())
    assert result["reps"] == 1 and [c["path"] for c in result["checkouts"]] == [str(REPO)]
    assert [r["command"] for r in result["rows"]] == ["pass", "make_table", "datasets_check", "sweep_help"]
    for row in result["rows"]:
        cell = row["checkouts"][str(REPO)]
        assert cell["failure"] is None and cell["returncodes"] == [0] and len(cell["runs_s"]) == 1
        assert cell["seconds"] == pytest.approx(cell["runs_s"][0], abs=1e-4) and cell["seconds"] > 0
        assert cell["cpu_s"][0] > 0


@pytest.mark.parametrize("args, message", [
    (["--commands", "make_tables"], "unknown command 'make_tables'; expected some of: pass, torch,"),
    (["--repo", "{tmp}"], "not a lora_zoo checkout (no main.py)"),
    (["--python", "{tmp}/no_python"], "no_python: no such interpreter"),
])
def test_bad_request_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "startup.json"
    proc = run_bench(*[a.format(tmp=tmp_path) for a in args], "--json", str(out))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert not out.exists()


def test_outcome_checks_what_each_command_promises(tmp_path):
    help_command, offline = bench.BY_NAME["make_table"], bench.BY_NAME["offline_weights"]
    out = tmp_path / "out"
    assert bench.outcome(help_command, 0, "usage: make_table.py [-h]\n", "", out) is None
    assert "no usage" in bench.outcome(help_command, 0, "", "", out)
    assert "exit 1, expected 0: ModuleNotFoundError: torch" in bench.outcome(
        help_command, 1, "", "Traceback (most recent call last):\nModuleNotFoundError: torch\n", out)
    error = ("error: no ViT-B-16 weights 'openai' in the default open_clip / Hugging Face cache (~/.cache/huggingface),"
             " and huggingface.co cannot be reached: set pretrained to a local weights file, or ...\n")
    assert bench.outcome(offline, 1, "", error, out) is None
    assert "2 lines" in bench.outcome(offline, 1, "", "class 'x' has 1 train images, fewer than 16\n" + error, out)
    assert "exit 0, expected 1" in bench.outcome(offline, 0, "", "", out)
    assert "one expected error line" in bench.outcome(offline, 1, "", "error: cannot download ViT-B-16\n", out)
    out.mkdir()
    assert "wrote" in bench.outcome(offline, 1, "", error, out)


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_hub_reachable(), reason="huggingface.co reachable: the command does not stop at the weights")
def test_offline_weights_command_ends_with_the_weights_error(tmp_path):
    data, env = bench.prepare(tmp_path, sys.executable)
    assert not any((tmp_path / "empty_cache").iterdir()) and env["HF_HUB_OFFLINE"] == "1"
    run = bench.run_once(bench.BY_NAME["offline_weights"], REPO, sys.executable, data, tmp_path, env)
    assert run["returncode"] == 1 and run["failure"] is None and run["seconds"] > 0


def test_medians_targets_and_failures_side_by_side():
    """Two checkouts, three runs each: the median is shown, the target is the reference's median + 1 s,
    and a failed command is a failed cell (with its reason) where the other checkout still has its time."""
    commands = bench.with_references(["main_help"])
    assert [c.name for c in commands] == ["torch", "main_help"]
    after, before = Path("/after"), Path("/before")

    def runs(*seconds):
        return [{"seconds": s, "cpu_seconds": s / 2, "returncode": 0, "failure": None} for s in seconds]
    measured = {"runs": {("/after", "torch"): runs(2.0, 2.6, 2.2), ("/after", "main_help"): runs(3.1, 3.0, 9.0),
                         ("/before", "torch"): runs(2.1, 2.1, 2.4),
                         ("/before", "main_help"): [{"seconds": 1.0, "cpu_seconds": 0.5, "returncode": 1,
                                                     "failure": "exit 1, expected 0: a | b"}]},
                "failures": {("/before", "main_help"): "exit 1, expected 0: a | b"}}
    rows = bench.summarise(commands, [after, before], measured)
    main_after, main_before = rows[1]["checkouts"]["/after"], rows[1]["checkouts"]["/before"]
    assert main_after["seconds"] == 3.1 and main_after["target_s"] == pytest.approx(3.2) and main_after["met"] is True
    assert main_before["seconds"] is None and main_before["met"] is None and main_before["returncodes"] == [1]
    assert rows[0]["checkouts"]["/before"]["seconds"] == 2.1 and rows[0]["checkouts"]["/before"]["met"] is None
    table = bench.markdown(rows, [after, before], {"/after": "after (abc)", "/before": "before (def)"}).splitlines()
    assert table[0] == "| command | target | after (abc) s | met | before (def) s | met |"
    assert table[2] == '| `python -c "import torch"` | — | 2.20 | — | 2.10 | — |'
    assert table[3] == ("| `main.py --help` | torch + 1 s | 3.10 | yes (≤ 3.20) "
                        "| failed: exit 1, expected 0: a / b | no |")
