"""``--task commonsense``: the NoRA paper's Table 1 protocol (LLM-Adapters) on tiny-lm, through ``main.py``.

Every weight method trains and evaluates; a run records Table 1's columns; a finished run is not trained twice; a
killed run resumes to the adapters an uninterrupted run ends with; bad input is one line, a non-zero exit and
nothing written; an exported NoRA loads in stock peft with the logits of our model; the tokenisation and batching
follow LLM-Adapters (EOS rule, left padding to a multiple of 8, labels -100); and transformers' Trainer, which the
repository's ``datasets/`` package breaks when run from the root, is never needed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_zoo as lz
from datasets.commonsense import TASKS
from datasets.commonsense_world import write_commonsense
from lora_zoo import cli, lm_train
from lora_zoo.lm_data import StepPlan, collate, tokenize_record
from lora_zoo.lm_models import TINY_LM_DIR, load_causal_lm

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
WEIGHT_METHODS = [m for m in lz.list_methods() if lz.get_method(m).kind == "weights"]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), train_per_task=6, test_per_task=3)


def run(data, out, *args, method="lora"):
    argv = ["--task", "commonsense", "--method", method, "--root_path", str(data), "--output_dir", str(out),
            "--n_iters", "2", "--batch_size", "8", "--micro_batch_size", "4", "--val_set_size", "8",
            "--eval_step", "1", "--eval_limit", "1", "--quiet", *args]
    return cli.run(argv)


def run_folder(out, method="lora", seed=42):
    return Path(out) / "tiny-lm" / "commonsense" / f"seed{seed}" / method


def test_a_run_records_table_1_columns_and_is_not_trained_twice(data, tmp_path, capsys):
    assert run(data, tmp_path, "--eval_untuned", "true") == 0
    folder = run_folder(tmp_path)
    result = json.loads((folder / "result.json").read_text())
    assert list(result["tasks"]) == list(TASKS) and result["test_records"] == dict.fromkeys(TASKS, 1)
    assert result["accuracy"] == pytest.approx(sum(result["tasks"].values()) / 8)
    assert result["eval_limit"] == 1 and result["display_name"] == "LoRA" and result["steps"] == 2
    assert result["trainable_params"] == 4 * 32 * ((128 + 128) + (128 + 64) * 2 + (128 + 384) * 2)
    assert result["train_seconds"] > 0 and result["peak_memory_mb"] > 0 and result["tokens_per_second"] > 0
    assert result["method_config"] == {"dropout": 0.05, "rank": 32, "alpha": 64.0, "rslora": False}
    assert result["lr"] == 3e-4 and set(result["untuned_tasks"]) == set(TASKS)
    assert result["validation"] and result["best_step"] in (1, 2)
    assert sorted(p.name for p in folder.iterdir()) == [".claim", "adapters.json", "adapters.safetensors",
                                                       "predictions.json", "result.json", "train.log"]
    predictions = json.loads((folder / "predictions.json").read_text())
    assert set(predictions["boolq"][0]) == {"answer", "pred", "output", "flag"}
    assert capsys.readouterr().out.strip().startswith("lora on tiny-lm (commonsense, seed 42): average")
    assert run(data, tmp_path) == 0
    assert "nothing to do, run already finished" in capsys.readouterr().err


def test_eval_only_scores_the_run_as_it_finished_and_refuses_an_edited_adapter_record(data, tmp_path, capsys):
    args = ("--eval_limit", "2", "--max_new_tokens", "8")
    assert run(data, tmp_path, *args, method="nora") == 0
    folder = run_folder(tmp_path, "nora")
    result, predictions = (json.loads((folder / name).read_text()) for name in ("result.json", "predictions.json"))
    assert run(data, tmp_path, *args, "--eval_only", method="nora") == 0
    evaluated = json.loads((folder / "eval.json").read_text())
    assert evaluated["tasks"] == result["tasks"] and evaluated["accuracy"] == result["accuracy"]
    assert json.loads((folder / "eval_predictions.json").read_text()) == predictions  # the same generations
    assert json.loads((folder / "predictions.json").read_text()) == predictions      # the run's own kept
    for name in ("eval.json", "eval_predictions.json", "eval.log"):
        (folder / name).unlink()
    record = json.loads((folder / "adapters.json").read_text())
    record["config"]["alpha"] = 9.0  # rebuilds NoRA's layers at another scale
    (folder / "adapters.json").write_text(json.dumps(record))
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert run(data, tmp_path, *args, "--eval_only", method="nora") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the record_sha256 recorded in it" in err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written: no eval.json, eval.log


def test_a_run_claimed_by_another_process_is_skipped_and_trains_once_released(data, tmp_path, capsys):
    folder = run_folder(tmp_path)
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lora_zoo.runlock import claim\n"
                               f"with claim({str(folder)!r}):\n    print('held', flush=True); time.sleep(120)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert run(data, tmp_path) == 0
        assert "skipped, running elsewhere" in capsys.readouterr().err
        assert not (folder / "result.json").exists() and not (folder / "adapters.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run(data, tmp_path) == 0 and json.loads((folder / "result.json").read_text())["steps"] == 2


def test_a_non_finite_loss_stops_the_run_in_one_line_and_records_nothing(data, tmp_path, capsys):
    capsys.readouterr()
    assert run(data, tmp_path, "--lr", "1e38", "--n_iters", "3") == 1  # warm-up: lr 0, then 1e36 sends them to inf
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training loss is nan at step 3/3" in err
    assert not (run_folder(tmp_path) / "result.json").exists()
    assert not (run_folder(tmp_path) / "adapters.safetensors").exists()


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_every_weight_method_trains_and_evaluates_on_tiny_lm(method, data, tmp_path):
    assert run(data, tmp_path, "--n_iters", "1", "--tasks", "winogrande", "--val_set_size", "0",
               "--max_new_tokens", "3", "--num_beams", "2", method=method) == 0
    result = json.loads((run_folder(tmp_path, method) / "result.json").read_text())
    assert set(result["tasks"]) == {"winogrande"} and result["trainable_params"] > 0
    assert result["merged"] is True and result["kind"] == "weights"


def test_a_killed_run_resumes_to_the_adapters_of_an_uninterrupted_one(data, tmp_path, monkeypatch):
    args = ("--n_iters", "4", "--checkpoint_every", "2", "--tasks", "boolq", "--dropout", "0.1", "--max_new_tokens", "4")
    assert run(data, tmp_path / "whole", *args) == 0
    step = lm_train._step

    def killed(model, ddp, loop, plan, train, index, *rest):
        if index == 3:
            raise KeyboardInterrupt
        return step(model, ddp, loop, plan, train, index, *rest)

    monkeypatch.setattr(lm_train, "_step", killed)
    assert run(data, tmp_path / "killed", *args) == 130
    assert (run_folder(tmp_path / "killed") / "checkpoint.pt").is_file()
    monkeypatch.setattr(lm_train, "_step", step)
    assert run(data, tmp_path / "killed", *args) == 0
    whole, resumed = (json.loads((run_folder(tmp_path / k) / "result.json").read_text()) for k in ("whole", "killed"))
    assert resumed["resumed_from"] == 2 and resumed["loss_history"] == whole["loss_history"]
    assert resumed["adapters_sha256"] == whole["adapters_sha256"]


@pytest.mark.parametrize("case", ["field", "task", "pattern", "not_linear", "pad", "clip_prompts", "clip_head",
                                  "clip_tensors", "base_model", "export"])
def test_bad_input_is_one_line_and_writes_nothing(case, data, tmp_path, capsys):
    root, extra, method = data, [], "lora"
    if case == "field":
        root = tmp_path / "bad"
        write_commonsense(root, 2, 1)
        records = json.loads((root / "commonsense_170k.json").read_text())
        del records[3]["output"]
        (root / "commonsense_170k.json").write_text(json.dumps(records))
    extra = {"task": ["--tasks", "boolq,mmlu"], "pattern": ["--targets", "q_proj,qkv_proj"],
             "not_linear": ["--targets", "self_attn"], "pad": ["--pad_token", "tokenizer"],
             "base_model": ["--base_model", str(tmp_path / "missing")],
             "export": ["--variant", "authors", "--export_peft", str(tmp_path / "out" / "peft")]}.get(case, [])
    method = {"clip_prompts": "coop", "clip_head": "tip_adapter", "clip_tensors": "twostage",
              "export": "aira"}.get(case, method)
    expected = {"field": "record 3 has no 'output' field", "task": "unknown commonsense task 'mmlu'",
                "pattern": "target pattern 'qkv_proj' matches no module of this LlamaForCausalLM",
                "not_linear": "matches model.layers.0.self_attn, a LlamaAttention",
                "pad": "the tokenizer has no pad token", "clip_prompts": "coop is a prompts method of CLIP",
                "clip_head": "tip_adapter is a head method of CLIP", "clip_tensors": "twostage is a tensors method of CLIP",
                "base_model": "is neither tiny-lm, an existing model folder, nor a Hugging Face model name",
                "export": "cannot export a peft adapter: aira with these options depends on the batch"}[case]
    out = tmp_path / "out"
    assert run(root, out, *extra, method=method) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists()


def test_an_exported_nora_loads_in_stock_peft_with_identical_logits(data, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    assert run(data, tmp_path, "--tasks", "boolq", "--export_peft", str(tmp_path / "peft"), "--lr", "1e-2",
               "--warmup_steps", "0", "--max_new_tokens", "4", method="nora") == 0
    ours, tokenizer = load_causal_lm("tiny-lm", torch.device("cpu"))
    lz.load_adapters(ours, run_folder(tmp_path, "nora") / "adapters.safetensors")
    assert any((a.delta_weight() - a.initial_delta_weight()).abs().max() > 1e-4
               for a in lz.adapter_modules(ours).values())  # trained: the update is not the initial one
    batch = tokenizer(["is ice cold?", "a fish lives in the river and eats worms."], padding=True,
                      return_tensors="pt")
    stock = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_LM_DIR, dtype=torch.float32),
                                           tmp_path / "peft").eval()
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(TINY_LM_DIR)
    with torch.no_grad():
        expected = ours(**batch).logits
        torch.testing.assert_close(stock(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        lz.merge_adapters(ours)
        torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_tokenisation_and_batches_follow_llm_adapters():
    _, tokenizer = load_causal_lm("tiny-lm", torch.device("cpu"))
    record = {"instruction": "is ice cold?", "input": "", "output": "the correct answer is true", "answer": "true"}
    ids = tokenize_record(tokenizer, record, 256)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenize_record(tokenizer, record, 20) == ids[:20]  # cut to the cutoff: no EOS
    assert tokenize_record(tokenizer, record, len(ids) - 1) == ids[:-1]  # exactly the cutoff without EOS: none added
    batch = collate([ids, ids[:5]], pad_id=0)
    width = -(-len(ids) // 8) * 8
    assert batch["input_ids"].shape == (2, width) and batch["input_ids"][1, :width - 5].eq(0).all()
    assert batch["labels"][1, :width - 5].eq(-100).all() and batch["labels"][1, -5:].tolist() == ids[:5]
    assert batch["attention_mask"].sum(1).tolist() == [len(ids), 5]
    plan = StepPlan(records=37, batch_size=16, micro_batch_size=4, seed=1, epochs=3)
    assert plan.steps == 9 and [len(plan.batch(s)) for s in range(3)] == [16, 16, 5]
    assert sorted(i for s in range(3) for i in plan.batch(s)) == list(range(37))
    for step in range(plan.steps):
        shares = [plan.share(step, rank, 2) for rank in range(2)]
        assert sorted(k for share in shares for k, _ in share) == list(range(len(plan.micro_batches(step))))


def test_our_loop_needs_no_trainer(data, tmp_path, monkeypatch):
    """The commonsense run with transformers' Trainer made unimportable (``sys.modules`` entry None)."""
    monkeypatch.setitem(sys.modules, "transformers.trainer", None)
    with pytest.raises(ImportError):
        from transformers.trainer import Trainer  # noqa: F401
    assert run(data, tmp_path, "--n_iters", "1", "--val_set_size", "0", "--tasks", "boolq", "--max_new_tokens",
               "4") == 0
    assert (run_folder(tmp_path) / "result.json").is_file()


def test_the_trainer_fails_with_the_repository_root_on_the_path(tmp_path):
    """The trap, measured: with the repository root on the path (pytest's ``pythonpath``, ``python main.py``),
    transformers counts our datasets/ as Hugging Face's, and a one-step Trainer on a tiny Llama fails in its data
    loader on ``datasets.Dataset``."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.utils import import_utils

    assert datasets.__file__ == str(REPO / "datasets" / "__init__.py") and import_utils.is_datasets_available()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    rows = [{"input_ids": torch.tensor([1, 5, 6, 2]), "labels": torch.tensor([1, 5, 6, 2])}] * 2
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(AttributeError, match="^module 'datasets' has no attribute 'Dataset'$"):
        Trainer(model=model, args=args, train_dataset=rows).train()

