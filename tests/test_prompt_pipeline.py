"""The prompt learners through ``main.py`` on tiny-clip: every protocol, a killed run resumed, the table's names, and
bad input (one line, non-zero exit, nothing written).

Synthetic DTD and EuroSAT (4 classes, 2 training images each), the official recipe shortened with ``--epochs 3``
and ``--batch_size 4`` (two batches per epoch: one warm-up epoch at 1e-5, then Dassl's cosine).
"""
import json
import math
from pathlib import Path

import pytest

from conftest import killed_at, synthetic_datasets
import lora_zoo as lz
from lora_zoo.cli import run as main_run
from scripts import make_table

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--backbone", "tiny-clip", "--shots", "2", "--epochs", "3", "--batch_size", "4", "--num_workers", "0",
       "--eval_batch_size", "32", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic_datasets(tmp_path_factory.mktemp("prompt_data"), {"dtd": 4, "eurosat": 4}, train_per_class=2)


def run(capsys, *args):
    code = main_run([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".claim"}


@pytest.fixture(scope="module")
def coop4_run(root, tmp_path_factory):
    """coop4 trained few-shot on DTD and evaluated on EuroSAT too (``--eval_on``)."""
    out = tmp_path_factory.mktemp("coop4")
    assert main_run(["--method", "coop4", "--root_path", str(root), "--output_dir", str(out), "--eval_on", "eurosat",
                     *RUN]) == 0
    return out, out / "tiny-clip/dtd/2shots/seed1/coop4"


def test_coop4_few_shot_with_its_recipe_and_eval_on_another_dataset(coop4_run, root, capsys):
    out, folder = coop4_run
    record = result(folder)
    assert (record["kind"], record["display_name"], record["optimizer"]) == ("prompts", "CoOp (4)", "sgd")
    assert record["method_config"] == {"n_ctx": None, "ctx_init": "a photo of a", "csc": False,
                                       "class_token_position": "end"}
    assert record["trainable_params"] == 4 * 64 and record["iterations"] == 3 * 2  # 8 images, batches of 4
    train = record["config"]["train"]
    assert (train["batch_size"], train["weight_decay"], train["drop_last"], train["lr_schedule"]) == \
        (4, 5e-4, True, "epoch_cosine")
    lrs = [float(line.split(",")[2]) for line in (folder / "curves.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([1e-5] * 2 + [0.002] * 2 + [0.002 * (1 + math.cos(math.pi / 3)) / 2] * 2)
    target = json.loads((folder / "eval_on/eurosat.json").read_text())
    assert record["eval_on"]["eurosat"] == target["accuracy"] and 0 <= target["accuracy"] <= 100
    # reloaded from its adapters (rebuilt from the record): the same accuracy
    code, err = run(capsys, "--method", "coop4", "--root_path", root, "--output_dir", out, "--eval_only", *RUN)
    assert code == 0 and json.loads((folder / "eval.json").read_text())["accuracy"] == record["accuracy"]
    table = capsys.readouterr().out if make_table.main([str(out), "--shots", "2", "--seeds", "1", "--no_reported",
                                                         "--format", "md"]) == 0 else ""
    assert "| CoOp (4) (ours, coop4) |" in table


def test_base_to_new_scores_the_new_classes_with_the_learned_context(root, tmp_path, capsys):
    code, _ = run(capsys, "--method", "kgcoop", "--root_path", root, "--output_dir", tmp_path, "--protocol",
                  "base2new", *RUN)
    record = result(tmp_path / "tiny-clip/dtd/base2new/2shots/seed1/kgcoop")
    assert code == 0 and record["protocol"] == "base2new" and record["iterations"] == 3 * 1  # 2 classes × 2: 1 batch
    assert record["harmonic_mean"] == pytest.approx(lz.results.harmonic_mean(record["base_accuracy"],
                                                                              record["new_accuracy"]))
    assert record["method_config"]["weight"] == 8.0 and record["config"]["train"]["batch_size"] == 4


@pytest.mark.parametrize("method", ["cocoop", "kgcoop", "prograd"])
def test_each_prompt_learner_under_every_protocol(method, root, tmp_path, capsys):
    """Few-shot with --eval_on, then base-to-new (coop4 above, coop16 its layer; reloading: test_methods.py)."""
    common = ["--method", method, "--root_path", root, "--output_dir", tmp_path, *RUN]
    assert run(capsys, *common, "--eval_on", "eurosat")[0] == 0
    record = result(tmp_path / f"tiny-clip/dtd/2shots/seed1/{method}")
    assert record["kind"] == "prompts" and 0 <= record["eval_on"]["eurosat"] <= 100
    assert run(capsys, *common, "--protocol", "base2new")[0] == 0
    halves = result(tmp_path / f"tiny-clip/dtd/base2new/2shots/seed1/{method}")
    assert halves["harmonic_mean"] == pytest.approx(lz.results.harmonic_mean(halves["base_accuracy"],
                                                                             halves["new_accuracy"]))


def test_a_killed_prograd_run_resumes_and_ends_bit_identical(root, tmp_path, capsys, monkeypatch):
    args = ["--method", "prograd", "--root_path", root, *RUN, "--checkpoint_every", "2"]
    assert run(capsys, *args, "--output_dir", tmp_path / "whole")[0] == 0
    import lora_zoo.train as train
    original = train.training_step
    monkeypatch.setattr(train, "training_step", killed_at(5))
    assert run(capsys, *args, "--output_dir", tmp_path / "killed")[0] == 130
    killed = tmp_path / "killed/tiny-clip/dtd/2shots/seed1/prograd"
    assert (killed / "checkpoint.pt").is_file() and not (killed / "result.json").exists()
    monkeypatch.setattr(train, "training_step", original)
    # a checkpoint of another n_ctx is not continued (nor lost)
    code, err = run(capsys, *args, "--output_dir", tmp_path / "killed", "--n_ctx", "8")
    assert code == 1 and len(err) == 1 and "method_options.n_ctx: 16 there, 8 now" in err[0]
    assert run(capsys, *args, "--output_dir", tmp_path / "killed")[0] == 0
    whole, resumed = result(tmp_path / "whole/tiny-clip/dtd/2shots/seed1/prograd"), result(killed)
    assert (resumed["resumed_from"], whole["resumed_from"], resumed["iterations"]) == (4, 0, 6)
    assert resumed["method_config"]["prograd_lambda"] == 1.0  # their README's lambda for DTD at 2 shots
    for key in ("accuracy", "final_loss", "loss_history", "adapters_sha256"):
        assert whole[key] == resumed[key], key


def test_prograd_lambda_follows_their_readme_unless_given():
    def resolved(*args):
        return lz.config.load_config([], dict(args)).method_config.prograd_lambda
    base = (("method", "prograd"), ("backbone", "tiny-clip"))
    assert resolved(*base, ("dataset", "dtd"), ("shots", 16)) == 0.8
    assert resolved(*base, ("dataset", "oxford_flowers"), ("shots", 8)) == 0.8
    assert resolved(*base, ("dataset", "dtd"), ("shots", 4)) == 1.0
    assert resolved(*base, ("dataset", "oxford_pets"), ("shots", 16)) == 1.0
    assert resolved(*base, ("dataset", "dtd"), ("shots", 16), ("method_options.prograd_lambda", 0.5)) == 0.5


@pytest.mark.parametrize("args, expect", [
    (["--method", "coop", "--n_ctx", "0"], "n_ctx must be >= 1, got 0"),
    (["--method", "coop", "--n_ctx", "40"], "coop: n_ctx 40 does not fit the text context of 32 tokens"),
    (["--method", "coop", "--n_ctx", "28"], "coop: with n_ctx 28 the prompt of class"),
    (["--method", "coop", "--n_ctx", "2", "--ctx_init", "a photo of a"],
     "ctx_init 'a photo of a' is 4 tokens, more than n_ctx 2"),
    (["--method", "coop", "--class_token_position", "left"],
     "class_token_position must be one of 'end', 'middle', 'front', got 'left'"),
    (["--method", "coop", "--csc", "true", "--protocol", "base2new"], "coop with csc learns one context per training "
                                                                      "class: it cannot score other classes"),
    (["--method", "prograd", "--n_ctx", "2"], "prograd: n_ctx 2 is shorter than the 3 words of the template "
                                              "'a texture of'"),
    (["--method", "coop4", "--export_merged", "{out}/merged.safetensors"],
     "cannot export merged weights: coop4 is a prompts method: it has no weight update to merge or export"),
    (["--method", "coop16", "--export_peft", "{out}/peft"], "cannot export a peft adapter: coop16 is a prompts method"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, expect, root, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(capsys, *[a.format(out=out) for a in args], "--root_path", root, "--output_dir", out, *RUN)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists()


def test_evaluating_a_run_with_another_n_ctx_is_refused_and_writes_nothing(coop4_run, root, capsys):
    out, folder = coop4_run
    before = files(folder)
    code, err = run(capsys, "--method", "coop4", "--n_ctx", "4", "--root_path", root, "--output_dir", out,
                    "--eval_only", *RUN)
    assert code == 1 and len(err) == 1 and "was trained with method_options.n_ctx=None, not 4" in err[0], err
    assert files(folder) == before


@pytest.mark.parametrize("method, flags", [
    ("coop", ("--n_ctx", "--ctx_init", "--csc", "--class_token_position")), ("coop4", ("CoOp (4)", "--n_ctx")),
    ("cocoop", ("--ctx_init",)), ("kgcoop", ("--weight",)), ("prograd", ("--prograd_lambda", "--temperature")),
])
def test_options_are_in_help(method, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_run(["--method", method, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(flag in out for flag in flags)
