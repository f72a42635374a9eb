"""``torchrun`` data parallelism of the commonsense task: 2 CPU processes (gloo) train the adapters 1 process trains.

The same command, at the same global batch (8 records in micro-batches of 2: 4 accumulated micro-batches on one
process, 2 on each of two), with dropout on: DDP averages the two processes' gradients, and the loop gives each
micro-batch the dropout masks of its index, so the adapters, the losses and the validation losses agree to float
tolerance (1e-3 of how far the adapters moved: gloo sums the gradients in another order, and AdamW's first steps
divide each gradient by its magnitude). Rank 0 alone writes, and prints the run's one summary line.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from datasets.commonsense_world import write_commonsense
from lora_zoo import cli

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_train_the_adapters_of_one(tmp_path, one_thread):
    data = write_commonsense(tmp_path / "data", train_per_task=4, test_per_task=1)
    args = ["--task", "commonsense", "--method", "lora", "--root_path", str(data), "--n_iters", "2", "--batch_size",
            "8", "--micro_batch_size", "2", "--val_set_size", "8", "--eval_step", "1", "--eval_limit", "1",
            "--tasks", "boolq,piqa", "--max_new_tokens", "2", "--lr", "1e-2", "--warmup_steps", "0",
            "--dropout", "0.1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "main.py", *args, "--output_dir", str(tmp_path / "two")], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.run(args + ["--output_dir", str(tmp_path / "one")]) == 0  # meanwhile, one process here
    stdout, stderr = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, stderr[-3000:]
    assert len([line for line in stdout.splitlines() if line.startswith("lora on tiny-lm")]) == 1
    folders = {n: tmp_path / n / "tiny-lm" / "commonsense" / "seed42" / "lora" for n in ("one", "two")}
    one, two = (json.loads((folders[n] / "result.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["loss_history"] == pytest.approx(one["loss_history"], rel=1e-5)
    assert [v for _, v in two["validation"]] == pytest.approx([v for _, v in one["validation"]], rel=1e-5)
    single, parallel = (load_file(folders[n] / "adapters.safetensors") for n in ("one", "two"))
    assert single.keys() == parallel.keys()
    moved = max(float(t.abs().max()) for k, t in single.items() if k.endswith("lora_B"))
    assert moved > 1e-3  # the steps changed the adapters
    # float tolerance: the two sum the micro-batches' gradients in another order (gloo's all-reduce), and AdamW's
    # first steps divide each gradient by its own magnitude, so the last bits show at ~1e-6 of the tensors' scale
    assert max(float((single[k] - parallel[k]).abs().max()) for k in single) < 1e-3 * moved
    assert sorted(p.name for p in folders["two"].iterdir()) == sorted(p.name for p in folders["one"].iterdir())
