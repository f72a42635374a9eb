"""``scripts/bench.py --task commonsense --quick``: weight methods, the frozen model and peft's LoRA on tiny-lm, side
by side, with the columns README's benchmark reports."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("peft")


def test_quick_commonsense_benchmark(tmp_path, capsys, one_thread):
    sys.path.insert(0, str(REPO / "scripts"))
    import bench

    bench.main(["--task", "commonsense", "--quick", "--methods", "lora", "nora", "aira", "lokr", "--reps", "1",
                "--json", str(tmp_path / "bench.json")])
    result = json.loads((tmp_path / "bench.json").read_text())
    (model,) = result["models"]
    rows = {r["method"]: r for r in model["rows"]}
    assert set(rows) == {"frozen", "peft lora r=8", "peft lora r=16", "peft lora r=32", "lora", "nora", "aira",
                         "lokr"}
    assert model["model"] == "tiny-lm" and model["tokens_per_step"] == 4 * 128
    assert rows["frozen"]["step_vs_frozen"] == 1.0 and rows["frozen"]["trainable"] == 0
    assert rows["peft lora r=32"]["trainable"] == rows["lora"]["trainable"] == 212992  # r 32 on q/k/v/up/down
    assert rows["nora"]["rank"] == 16 and rows["aira"]["rank"] == 8 and rows["lora"]["rank"] == 32
    assert rows["peft lora r=16"]["step_vs_peft_lora"] == 1.0
    for row in rows.values():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0
        assert row["saved_activation_bytes"] >= rows["frozen"]["saved_activation_bytes"] > 0
    out = capsys.readouterr().out
    assert "| method | trainable | step (ms) | × frozen | × peft LoRA (same rank) | tokens/s |" in out
    assert "| nora | 52,224 |" in out
