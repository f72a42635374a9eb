"""The feature heads from the command line on tiny-clip: every protocol, a resume, the features read from the
cache by a rerun, a resumed run and the other heads, the post-training selection recorded, tables marking a
test-selected row, and the bad inputs (no validation split to search on, features that would not fit in memory):
one line, nothing written."""
import json
from pathlib import Path

import pytest

import lora_zoo.train as train
from conftest import killed_at, synthetic_datasets
from lora_zoo.cli import run
from scripts import make_table

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = ["--backbone", "tiny-clip", "--shots", "2", "--num_workers", "0", "--eval_batch_size", "16", "--epochs", "3",
         "--quiet"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """DTD (4 classes) and EuroSAT (3 classes), 32 px, under one root; and a DTD without validation images."""
    from datasets import write_synthetic_dataset
    root = tmp_path_factory.mktemp("heads")
    synthetic_datasets(root / "data", {"dtd": 4, "eurosat": 3}, train_per_class=3, test_per_class=3)
    write_synthetic_dataset(root / "no_val", "dtd", num_classes=4, train_per_class=3, val_per_class=0,
                            test_per_class=3, image_size=32)
    return root


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


def result(out, method, protocol=()) -> dict:
    return json.loads(Path(out, "tiny-clip", "dtd", *protocol, "2shots", "seed1", method, "result.json").read_text())


def test_every_head_under_a_protocol_and_the_features_read_once_encoded(two_datasets, tmp_path, capsys, encoded_views):
    out, data = tmp_path / "out", two_datasets / "data"
    base = ["--root_path", data, "--output_dir", out, *SHORT]
    assert cli(capsys, "--method", "tip_adapter", *base, "--eval_on", "eurosat")[0] == 0   # encodes its 10 views
    assert cli(capsys, "--method", "lp_pp", *base)[0] == 0                                 # reads 1 of them
    assert cli(capsys, "--method", "taskres", *base)[0] == 0                               # 3 epochs: 3 views read
    assert cli(capsys, "--method", "clip_adapter", *base, "--protocol", "base2new")[0] == 0  # base half: its own
    assert cli(capsys, "--method", "taskres", *base, "--protocol", "base2new")[0] == 0     # reads clip_adapter's
    assert encoded_views == [(0, 10), (0, 3)]
    assert len(list((out / ".cache" / "features").glob("views-*.safetensors"))) == 2
    tip = result(out, "tip_adapter")
    assert tip["selected_on"] == "val" and tip["tip_alpha"] >= 0 and tip["kind"] == "head"
    assert tip["display_name"] == "TIP-Adapter-F" and tip["iterations"] == 3 and tip["trainable_params"] == 8 * 64
    transfer = json.loads((out / "tiny-clip/dtd/2shots/seed1/tip_adapter/eval_on/eurosat.json").read_text())
    assert 0 <= transfer["accuracy"] <= 100 and transfer["classes"] == 3
    for method, protocol in (("clip_adapter", ("base2new",)), ("taskres", ("base2new",))):
        record = result(out, method, protocol)
        assert {"base_accuracy", "new_accuracy", "harmonic_mean"} <= set(record)
    # new classes: TaskRes has no residual rows for them, so its new accuracy is CLIP's zero-shot one
    record = result(out, "taskres", ("base2new",))
    assert record["new_accuracy"] == record["zero_shot_new_accuracy"]
    lp = result(out, "lp_pp")
    assert lp["iterations"] == 3 and lp["optimizer"] == "lp_pp" and "4N/lambda_max" in lp["optimizer_groups"][0]["name"]
    assert cli(capsys, "--method", "lp_pp", *base, "--eval_only")[0] == 0          # reloaded: the same accuracy
    assert json.loads((out / "tiny-clip/dtd/2shots/seed1/lp_pp/eval.json").read_text())["accuracy"] == lp["accuracy"]
    assert encoded_views == [(0, 10), (0, 3)]


def test_a_killed_run_resumes_from_its_checkpoint_and_the_cache_and_ends_as_an_uninterrupted_one(
        two_datasets, tmp_path, capsys, monkeypatch, encoded_views):
    """Tip-Adapter-F as its authors ran it: the keys after every epoch are kept across the kill (its checkpoint), the
    epoch with the best test accuracy is kept, and the result and tables say it was selected on test."""
    args = ["--method", "tip_adapter", "--root_path", two_datasets / "data", *SHORT, "--batch_size", "4",
            "--checkpoint_every", "1", "--set", "method_options.variant=authors"]
    with monkeypatch.context() as patch:
        patch.setattr(train, "training_step", killed_at(2))
        assert cli(capsys, *args, "--output_dir", tmp_path / "out")[0] == 130
    assert cli(capsys, *args, "--output_dir", tmp_path / "out")[0] == 0
    assert encoded_views == [(0, 10)]                                   # the resumed run read the features
    assert cli(capsys, *args, "--output_dir", tmp_path / "whole")[0] == 0
    resumed, whole = result(tmp_path / "out", "tip_adapter"), result(tmp_path / "whole", "tip_adapter")
    assert resumed["resumed_from"] == 2 and resumed["iterations"] == 3 * 2  # 8 images, batch 4: 2 per epoch
    for key in ("accuracy", "loss_history", "tip_test_selected_epoch", "tip_beta", "tip_alpha", "selected_on"):
        assert resumed[key] == whole[key], key
    assert resumed["selected_on"] == "test" and resumed["adapters_sha256"] == whole["adapters_sha256"]
    code = make_table.main([str(tmp_path / "whole"), "--format", "csv", "--no_reported"])
    assert code == 0 and "TIP-Adapter-F (ours, tip_adapter) [test-selected]" in capsys.readouterr().out


def test_training_free_tip_adapter_skips_the_loop(two_datasets, tmp_path, capsys):
    args = ["--method", "tip_adapter", "--root_path", two_datasets / "data", "--output_dir", tmp_path / "out", *SHORT,
            "--set", "method_options.finetune=false"]
    assert cli(capsys, *args)[0] == 0
    record = result(tmp_path / "out", "tip_adapter")
    assert (record["iterations"], record["trainable_params"], record["selected_on"]) == (0, 0, "val")
    assert not (tmp_path / "out/tiny-clip/dtd/2shots/seed1/tip_adapter/checkpoint.pt").exists()
    assert cli(capsys, *args, "--eval_only")[0] == 0
    assert json.loads((tmp_path / "out/tiny-clip/dtd/2shots/seed1/tip_adapter/eval.json").read_text())["accuracy"] \
        == record["accuracy"]


@pytest.mark.parametrize("case, message", [
    ("no validation split", "tip_adapter searches beta and alpha on the validation split, and dtd has no validation "
                            "images: give it a val split, or keep the training values with "
                            "--set method_options.search=false"),
    ("no memory", r"lp_pp needs about 0\.0 GiB for 8 training images of 4 classes \(1 augmented views of 64-d "
                  r"features\); cpu has 0\.0 GiB free: use fewer shots or classes"),
])
def test_a_task_the_head_cannot_train_is_one_line_before_any_work(case, message, two_datasets, tmp_path, capsys,
                                                                  monkeypatch, encoded_views):
    import re

    import lora_zoo.learner as learner
    method, root = ("tip_adapter", two_datasets / "no_val") if case.startswith("no val") else \
        ("lp_pp", two_datasets / "data")
    monkeypatch.setattr(learner, "free_memory", lambda device: 1 if case == "no memory" else None)
    code, err = cli(capsys, "--method", method, "--root_path", root, "--output_dir", tmp_path / "out", *SHORT)
    assert code != 0 and err.count("\n") == 1 and re.search(message if case == "no memory" else re.escape(message),
                                                            err), err
    assert not (tmp_path / "out").exists() and encoded_views == []    # nothing written, nothing encoded_views
