"""scripts/bench.py --quick: every method measured side by side, with numbers that follow from the setup."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lora_zoo as lz

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_covers_every_method(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"frozen", "lora r=16", *lz.list_methods()}
    assert "| nora |" in proc.stdout and "× frozen" in proc.stdout  # the Markdown table
    frozen, lora16 = rows["frozen"], rows["lora r=16"]
    assert frozen["step_vs_frozen"] == 1.0 and lora16["step_vs_lora_r_inner"] == 1.0
    assert frozen["trainable"] == 0 and frozen["adapter_bytes"] == 0
    # tiny-vit: 2 towers × 2 blocks × q/k/v, all 64 wide
    assert rows["lora"]["trainable"] == 12 * 2 * (64 + 64)
    assert lora16["trainable"] == 12 * 16 * (64 + 64)
    assert rows["nora"]["trainable"] == 12 * 2 * 51 * 16
    heads = {m for m in lz.list_methods() if lz.get_method(m).kind == "head"}
    for name, row in rows.items():
        assert row["step_s"] > 0 and row["step_vs_frozen"] > 0
        weights = name in ("frozen", "lora r=16") or lz.get_method(name).kind == "weights"
        # the frozen bound trains the positional embeddings; tuned backbone tensors (2SFS's first stage: the blocks'
        # LayerNorms) need nothing saved before block 0, 18 kB less on tiny-vit
        tensors = not weights and lz.kind_of(name).name == "tensors"
        if name in heads:  # a head steps on features encoded once: no tower in its backward
            assert 0 < row["saved_activation_bytes"] < frozen["saved_activation_bytes"] / 10
        elif weights or tensors:  # a weight update keeps what the frozen bound keeps (both towers) and more
            assert row["saved_activation_bytes"] >= (0.99 if tensors else 1) * frozen["saved_activation_bytes"] > 0
        else:  # a prompt learner's image tower may need no backward
            assert row["saved_activation_bytes"] >= 1
        if name != "frozen":
            assert row["adapter_bytes"] > 0 and row["trainable"] > 0
            if weights:
                assert row["eval_vs_plain"] > 0  # every default weights config is mergeable
            else:
                assert row["eval_vs_plain"] is None  # a learner has no weight update to merge
    # per-token state: NoRA keeps what a rank-r_in LoRA keeps, not a rank-r_out one's (a rank-51 hidden
    # state would add 12 layers × 35 more values per token); the only extra is each layer's per-step
    # factors (d_out × 16 and 16 × d_in fp32 values), likewise AIRA's scaled up-projection
    per_step_factors = 12 * 2 * 64 * 16 * 4
    assert rows["nora"]["saved_activation_bytes"] <= lora16["saved_activation_bytes"] + per_step_factors
    assert rows["aira"]["saved_activation_bytes"] <= lora16["saved_activation_bytes"] + per_step_factors
    # the pipeline part: the cut context and the decoded cache change times, never numbers
    pipe = result["pipeline"]
    assert pipe["prompts"] == 101 and pipe["context_full"] == 32 and pipe["context_cut"] < pipe["context_full"]
    assert pipe["max_feature_diff"] < 1e-4 and pipe["first_loss_diff"] < 1e-4 and pipe["data_identical"] is True
    assert pipe["projected_run_s"] == pytest.approx(500 * 16 * pipe["step_cut_s"] + 30300 / pipe["eval_images_per_s"])
    assert "| text tower fwd+bwd, 101 prompts" in proc.stdout and "Projected seconds per 16-shot run" in proc.stdout
    # a head trained on features encoded once (2 views) against re-encoding every epoch (4), and a rerun reading
    # them: the cached view 0 is the first epoch's batch, the same crops
    assert (pipe["head_epochs"], pipe["head_views"], pipe["head_steps"]) == (4, 2, 4)
    assert pipe["head_feature_diff"] < 1e-5 and pipe["head_reencode_s"] > 0 and pipe["head_rerun_s"] > 0
    assert pipe["head_cached_speedup"] == pytest.approx(pipe["head_reencode_s"] / pipe["head_cached_s"])
    assert "| training a head, 4 epochs × 8 JPEGs" in proc.stdout

    # the prompt learners: CoOp's step on the cut context, CoCoOp's batch in one pass, each at equal logits
    prompts = result["prompts"]
    assert prompts["coop_context_full"] == 32 and prompts["coop_context_cut"] < 32 and prompts["coop_prompts"] == 101
    assert prompts["coop_logit_diff"] < 1e-4 and prompts["cocoop_logit_diff"] < 1e-4 and prompts["cocoop_batch"] == 4
    assert prompts["coop_speedup"] == pytest.approx(prompts["coop_step_full_s"] / prompts["coop_step_cut_s"])
    assert prompts["cocoop_speedup"] == pytest.approx(prompts["cocoop_loop_s"] / prompts["cocoop_batched_s"])
    assert "| CoOp (16) training step, batch 8, 101 prompts" in proc.stdout and "per-image loop vs" in proc.stdout


def test_dropout_override_shows_what_dropout_costs(tmp_path):
    """--dropout 0: the methods that drop their adapter input no longer save the masks for backward."""
    saved = {}
    for dropout in ("0.25", "0"):
        out = tmp_path / f"bench{dropout}.json"
        proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--part", "methods", "--methods", "lora",
                               "vera", "--dropout", dropout, "--json", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        assert result["setup"]["dropout"] == float(dropout)
        saved[dropout] = {r["method"]: r["saved_activation_bytes"] for r in result["rows"]}
    assert set(saved["0"]) == {"frozen", "lora r=16", "lora", "vera"}
    assert saved["0"]["frozen"] == saved["0.25"]["frozen"]
    for method in ("lora r=16", "lora", "vera"):  # a kept input per adapted layer, at least (12 layers here)
        assert saved["0"][method] < saved["0.25"][method] - 12 * 8 * 64 * 4 * 0.5
