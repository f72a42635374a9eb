"""MaPLe and PLOT++ as runs of the pipeline on tiny-clip: through the command line under each protocol, resumed
after a kill, reloaded for evaluation, and bad input refused in one line with nothing written.

Synthetic DTD (4 classes) and EuroSAT (3 classes), 2 shots; each method's own recipe (SGD, Dassl's warm-up and
per-epoch cosine) with fewer epochs where said.
"""
import json
import math
from pathlib import Path

import pytest

from conftest import killed_at, synthetic_datasets
import lora_zoo as lz
import main
from lora_zoo.models import build_clip
from lora_zoo.runs import read_result

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--backbone", "tiny-clip", "--shots", "2", "--num_workers", "0", "--eval_batch_size", "16", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic_datasets(tmp_path_factory.mktemp("prompt_data"), {"dtd": 4, "eurosat": 3})


def run(capsys, argv, method):
    code = main.run([str(a) for a in argv], method)
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(capsys, argv, method) -> str:
    code, err = run(capsys, argv, method)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def lrs(folder: Path) -> list[float]:
    return [float(line.split(",")[2]) for line in (folder / "curves.csv").read_text().splitlines()[1:]]


def test_maple_few_shot_and_other_datasets_from_the_command_line(root, tmp_path, capsys):
    args = ["--root_path", root, "--output_dir", tmp_path, *TINY, "--depth", "3"]
    assert run(capsys, args + ["--eval_on", "eurosat"], "maple")[0] == 0
    folder = tmp_path / "tiny-clip/dtd/2shots/seed1/maple"
    result = read_result(folder)
    # its recipe: 5 epochs of floor(8 / 4) batches, the first at the warm-up lr, then Dassl's cosine over 5
    assert (result["kind"], result["optimizer"], result["iterations"], result["display_name"]) == \
        ("prompts", "sgd", 10, "MaPLe")
    assert lrs(folder) == pytest.approx([1e-5] * 2 + [0.0035 * (1 + math.cos(math.pi * e / 5)) / 2
                                                      for e in range(4) for _ in range(2)])
    assert (folder / "eval_on/eurosat.json").is_file() and set(result["eval_on"]) == {"eurosat"}
    # reloaded (a learner rebuilt from its record, its tensors loaded): the same accuracy on both datasets
    assert run(capsys, args + ["--eval_only", "--eval_on", "eurosat"], "maple")[0] == 0
    again = json.loads((folder / "eval.json").read_text())
    assert again["accuracy"] == result["accuracy"] and again["eval_on"] == result["eval_on"]
    # a checkpoint of another depth is not evaluated as this one
    line = one_line(capsys, args[:-2] + ["--depth", "2", "--eval_only"], "maple")
    assert "depth=3" in line and "not 2" in line
    # CLIP-LoRA's loop instead of the method's recipe: AdamW, n_iters x shots iterations, the method's lr
    assert run(capsys, args + ["--recipe", "clip_lora", "--n_iters", "2", "--run_name", "clip_lora"], "maple")[0] == 0
    clip_lora = read_result(tmp_path / "tiny-clip/dtd/2shots/seed1/maple-clip_lora")
    assert (clip_lora["optimizer"], clip_lora["iterations"], clip_lora["config"]["train"]["lr"]) == ("adamw", 4, 0.0035)


def test_plot_base_to_new_from_the_command_line(root, tmp_path, capsys):
    args = ["--root_path", root, "--output_dir", tmp_path, *TINY, "--protocol", "base2new", "--epochs", "4",
            "--batch_size", "2", "--n_visual", "2"]
    assert run(capsys, args, "plot")[0] == 0
    folder = tmp_path / "tiny-clip/dtd/base2new/2shots/seed1/plot"
    result = read_result(folder)
    assert {"base_accuracy", "new_accuracy", "harmonic_mean"} <= result.keys() and result["display_name"] == "PLOT++"
    # 2 base classes x 2 shots, batches of 2: 2 per epoch; two stages of 2 epochs, each its own warm-up and cosine
    assert lrs(folder) == pytest.approx([1e-5, 1e-5, 0.002, 0.002] * 2)
    assert result["hooks_summary"] == {"plot_joint_from_iteration": 4} and result["skipped_steps"] == 0
    # the new classes are scored with prompts of their own names on the trained contexts (the saved learner)
    model = build_clip("tiny-clip").model
    lz.load_adapters(model, folder / "adapters.safetensors")
    assert model.lora_zoo_learner.templates == ["a photo of a texture", "this is a photo texture",
                                                "this is a picture texture", "one picture of a texture"]
    assert model.lora_zoo_learner.stage == "joint"


def test_plot_resumes_bit_identically_after_a_kill_across_its_stage_switch(root, tmp_path, capsys, monkeypatch):
    args = ["--root_path", root, *TINY, "--epochs", "4", "--batch_size", "4", "--n_visual", "2",
            "--checkpoint_every", "3"]  # 8 iterations, the joint stage from 4
    assert run(capsys, args + ["--output_dir", tmp_path / "whole"], "plot")[0] == 0
    import lora_zoo.train as train
    original = train.training_step
    monkeypatch.setattr(train, "training_step", killed_at(5))
    assert run(capsys, args + ["--output_dir", tmp_path / "killed"], "plot")[0] == 130
    monkeypatch.setattr(train, "training_step", original)
    assert run(capsys, args + ["--output_dir", tmp_path / "killed"], "plot")[0] == 0
    whole, killed = (tmp_path / name / "tiny-clip/dtd/2shots/seed1/plot" for name in ("whole", "killed"))
    first, resumed = read_result(whole), read_result(killed)
    assert resumed["resumed_from"] == 3 and first["iterations"] == 8  # resumed in the first stage, before the switch
    for key in ("accuracy", "final_loss", "loss_history", "hooks_summary", "skipped_steps"):
        assert first[key] == resumed[key], key
    assert (whole / "adapters.safetensors").read_bytes() == (killed / "adapters.safetensors").read_bytes()
    assert (whole / "curves.csv").read_text() == (killed / "curves.csv").read_text()


@pytest.mark.parametrize("method, options, message", [
    ("maple", ["--depth", "9"], "maple depth 9 exceeds the blocks of the towers (vision 4, text 4)"),
    ("maple", ["--depth", "3", "--n_ctx", "0"], "maple n_ctx must be >= 1, got 0"),
    ("maple", ["--depth", "3", "--n_ctx", "30"],
     "maple n_ctx 30 leaves no room for a class name in the text context of 32 tokens"),
    # 28 placeholders + "red stripes." + start and end: 33 tokens
    ("maple", ["--depth", "3", "--n_ctx", "28"], "is longer than the text context of 32 tokens"),
    ("plot", ["--n_text", "5"], "plot n_text must be 1..4 (their templates per dataset), got 5"),
    ("plot", ["--n_visual", "0"], "plot n_visual must be >= 1, got 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(method, options, message, root, tmp_path, capsys):
    line = one_line(capsys, ["--root_path", root, "--output_dir", tmp_path / "out", *TINY, *options], method)
    assert message in line and not (tmp_path / "out").exists()


def test_a_checkpoint_loads_only_into_its_own_shapes(tmp_path):
    backbone = build_clip("tiny-clip")
    classes = lz.ClassSet.of(("dog", "cat"), ["a photo of a dog.", "a photo of a cat."], backbone.tokenizer)
    lz.apply_method(backbone.model, "maple", classes=classes, depth=3)
    lz.save_adapters(backbone.model, tmp_path / "a.safetensors")
    other = build_clip("tiny-clip").model
    lz.apply_method(other, "maple", classes=classes, depth=2)
    with pytest.raises(ValueError, match=r"was saved with depth=3, but the model's adapters have depth=2$"):
        lz.load_adapters(other, tmp_path / "a.safetensors")
