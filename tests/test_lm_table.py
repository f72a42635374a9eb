"""``make_table --task commonsense``: runs of the commonsense task in the NoRA paper's Table 1 columns, from their
``result.json`` alone (lora_zoo/lm_tables.py)."""
import json
import sys
from pathlib import Path

from datasets.commonsense import TASKS

REPO = Path(__file__).resolve().parents[1]


def test_make_table_prints_table_1_columns(tmp_path, capsys):
    """Two LoRA ranks (run names), NoRA with two seeds, an untuned row; a run of another eval limit, its own table."""
    sys.path.insert(0, str(REPO))
    from scripts import make_table

    def write(method, run_name, seed, scores, limit=50, untuned=None, display="LoRA"):
        record = {"task": "commonsense", "protocol": "commonsense", "method": method, "display_name": display,
                  "run_name": run_name, "base_model": "tiny-lm", "seed": seed, "eval_limit": limit,
                  "tasks": dict(zip(TASKS, scores)), "accuracy": sum(scores) / 8, "trainable_params": 212992,
                  "base_params": 918656, "train_seconds": 90.0, "peak_memory_mb": 900.0,
                  "peak_memory_kind": "cpu_maxrss", **({"untuned_tasks": untuned} if untuned else {})}
        folder = tmp_path / method / str(run_name) / str(seed) / str(limit)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(record))

    write("lora", "r16", 42, [60.0] * 8, untuned=dict.fromkeys(TASKS, 10.0))
    write("lora", "r32", 42, [70.0] * 8)
    write("nora", None, 1, [80.0] * 8, display="NoRA")
    write("nora", None, 2, [82.0] * 8, display="NoRA")
    write("nora", None, 1, [50.0] * 8, limit=None, display="NoRA")
    assert make_table.main([str(tmp_path), "--task", "commonsense", "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert out.count("| Method | Params | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg. | "
                     "Train time | Memory |") == 2
    assert "first 50 test records of each task" in out and "the full test sets" in out
    assert "| untuned | 0 | 10.0 |" in out and "| LoRA (r16) | 0.213M (23.185%) | 60.0 |" in out
    assert "| NoRA | 0.213M (23.185%) | 81.0 (n=2) |" in out and "| 1.5 min | 900 MiB RSS |" in out
    assert make_table.main([str(tmp_path / "lora" / "r16"), "--task", "classification"]) == 2  # not CLIP runs
