"""The three other protocols end to end: base-to-new runs, cross-dataset and domain sweeps, their tables.

On synthetic trees (datasets/synthetic.py) in the real layouts, tiny-vit, 2 iterations: a base-to-new run's
Base/New/HM equal the saved adapters scored directly on the two halves; a cross-dataset sweep trains the
ImageNet source once and the domain sweep evaluates the same adapters on the four variants without retraining
(train.log, result.json and the adapters untouched); each recorded target accuracy equals the loaded adapters
scored directly; a second sweep does nothing; a run another process holds is left to it; bad input is one
line with nothing written; ``make_table.py --protocol ...`` gives the hand-computed cells.
"""
import csv
import json
import os
import shutil
import statistics
import subprocess
from io import StringIO
from pathlib import Path

import pytest
import torch

from datasets import build_data_loader, build_dataset, build_test_dataset, build_test_transform
from datasets import write_synthetic_dataset
from lora_zoo.checkpoint import load_adapters
from lora_zoo.cli import run as main_run
from lora_zoo.inject import merge_adapters
from lora_zoo.models import build_clip
from lora_zoo.catalog import get_method
from lora_zoo.runlock import claim
from lora_zoo.evaluation import evaluate
from scripts import make_table, sweep
from scripts.sweep_plan import Standing, is_complete

pytestmark = pytest.mark.usefixtures("one_thread")
RUN_ARGS = ["--n_iters", "2", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16", "--lr", "0.05"]
VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ImageNet (6 classes), DTD (6), EuroSAT (3) and the four variants of that ImageNet (A and R: 3 of 6)."""
    root = tmp_path_factory.mktemp("protocol_data")
    sizes = dict(train_per_class=4, val_per_class=4, test_per_class=3, image_size=32)
    for name, classes in (("imagenet", 6), ("dtd", 6), ("eurosat", 3), *((v, 6) for v in VARIANTS)):
        write_synthetic_dataset(root, name, num_classes=classes, **sizes)
    return root


def sweep_args(root, out, protocol, *options, seeds=("--seeds", "1")):
    return ["--root_path", str(root), "--output_dir", str(out), "--backbone", "tiny-vit", "--methods", "lora",
            "--protocol", protocol, *seeds, *options, "--", *RUN_ARGS]


def run_sweep(capsys, *args) -> str:
    assert sweep.main([str(a) for a in args]) == 0
    return capsys.readouterr().err


def scored(model, dataset) -> float:
    """Top-1 of ``model`` on ``dataset``'s test split over its own classes' prompts, as a reader would score it."""
    tokens = build_clip("tiny-vit", None, CPU).tokenizer(dataset.prompts(None))
    loader = build_data_loader(dataset.test, build_test_transform(model), batch_size=16, num_workers=0)
    return evaluate(model, loader, tokens, CPU)


def adapted(folder: Path, merged: bool = True):
    """A fresh tiny-vit (the runs' backbone_seed 0) with the run's saved adapters loaded (and merged)."""
    model = build_clip("tiny-vit", None, CPU, seed=0).model
    load_adapters(model, folder / "adapters.safetensors")
    if merged:
        merge_adapters(model)
    return model


def stamps(folder: Path) -> dict:
    """Every file under ``folder`` with its modification time and bytes (not the run claims' ``.claim``: each pass
    on a folder, evaluation included, claims it)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".claim"}


def csv_rows(capsys, *args) -> list[list[str]]:
    assert make_table.main([str(a) for a in args] + ["--format", "csv"]) == 0
    block = capsys.readouterr().out.strip().split("\n\n")[1]
    return [row for row in csv.reader(StringIO(block)) if row]


# ---- base-to-new ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base2new(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("base2new")
    assert sweep.main(sweep_args(root, out, "base2new", "--datasets", "dtd", "--shots", "2")) == 0
    assert sweep.main(sweep_args(root, out, "fewshot", "--datasets", "dtd", "--shots", "2")) == 0
    return out


def test_base_to_new_records_what_the_saved_adapters_score_on_each_half(root, base2new):
    folder = base2new / "tiny-vit" / "dtd" / "base2new" / "2shots" / "seed1" / "lora"
    r = json.loads((folder / "result.json").read_text())
    base_half = build_dataset("dtd", root, shots=2, seed=1, subsample="base")
    new_half = build_test_dataset("dtd", root, subsample="new")
    names = build_test_dataset("dtd", root).classnames
    assert r["protocol"] == "base2new" and r["base_classes"] == names[:3] and r["new_classes"] == names[3:]
    assert (r["base_test_images"], r["new_test_images"], r["train_images"]) == (9, 9, 6)  # 3 classes × 3, × 2 shots
    base, new = r["base_accuracy"], r["new_accuracy"]
    assert r["accuracy"] == base and r["harmonic_mean"] == pytest.approx(2 * base * new / (base + new))
    assert r["iterations"] == 4  # n_iters 2 × 2 shots
    model = adapted(folder)
    assert scored(model, base_half) == pytest.approx(base) and scored(model, new_half) == pytest.approx(new)
    pretrained = build_clip("tiny-vit", None, CPU, seed=0).model
    assert scored(pretrained, base_half) == pytest.approx(r["zero_shot_base_accuracy"])
    assert scored(pretrained, new_half) == pytest.approx(r["zero_shot_new_accuracy"])
    assert (base, new) != (r["zero_shot_base_accuracy"], r["zero_shot_new_accuracy"])  # the adapters matter here


def test_base_to_new_run_folder_is_apart_from_the_few_shot_run(base2new, capsys, root):
    runs = base2new / "tiny-vit" / "dtd"
    b2n, fewshot = (json.loads(p.read_text()) for p in (runs / "base2new/2shots/seed1/lora/result.json",
                                                         runs / "2shots/seed1/lora/result.json"))
    assert fewshot["protocol"] == "fewshot" and "base_accuracy" not in fewshot
    assert (fewshot["test_images"], fewshot["train_images"]) == (18, 12)  # every class: 6 × 3 test, 6 × 2 shots
    assert b2n["train_subset_sha1"] != fewshot["train_subset_sha1"]
    before = stamps(base2new / "tiny-vit")
    err = run_sweep(capsys, *sweep_args(root, base2new, "base2new", "--datasets", "dtd", "--shots", "2"))
    assert "sweep: 1 runs, 1 finished, 0 to do" in err and stamps(base2new / "tiny-vit") == before


def test_base_to_new_table_cells(capsys, base2new):
    r = json.loads(next(base2new.rglob("base2new/**/result.json")).read_text())
    rows = csv_rows(capsys, base2new, "--protocol", "base2new")
    zero_base, zero_new = r["zero_shot_base_accuracy"], r["zero_shot_new_accuracy"]
    zero_hm = 2 * zero_base * zero_new / (zero_base + zero_new) if zero_base + zero_new else 0.0
    cells = [f"{v:.2f}" for v in (r["base_accuracy"], r["new_accuracy"], r["harmonic_mean"])]
    zero = [f"{v:.2f}" for v in (zero_base, zero_new, zero_hm)]
    assert rows == [["Dataset", "Method", "Base", "New", "HM"],
                    ["Average over 1 datasets", "Zero-shot (the pretrained model, no training)", *zero],
                    ["Average over 1 datasets", "CLIP-LoRA (ours, lora)", *cells],
                    ["DTD", "Zero-shot (the pretrained model, no training)", *zero],
                    ["DTD", "CLIP-LoRA (ours, lora)", *cells]]


# ---- cross-dataset transfer and domain generalisation -----------------------------------------------------
@pytest.fixture(scope="module")
def transfer(root, tmp_path_factory):
    """The cross-dataset sweep (trains the source), then the domain sweep on the same run; files after each."""
    out = tmp_path_factory.mktemp("transfer")
    assert sweep.main(sweep_args(root, out, "cross_dataset", "--shots", "1")) == 0
    after_cross = stamps(out / "tiny-vit")
    assert sweep.main(sweep_args(root, out, "domain", "--shots", "1")) == 0
    return out, out / "tiny-vit" / "imagenet" / "1shots" / "seed1" / "lora", after_cross


def test_cross_dataset_and_domain_plans_default_to_imagenet_16_shots_seeds_1_to_3(capsys, root, tmp_path):
    for protocol, targets in (("cross_dataset", "dtd,eurosat"), ("domain", ",".join(VARIANTS))):
        assert sweep.main(sweep_args(root, tmp_path / "o", protocol, "--dry_run", seeds=())) == 0
        captured = capsys.readouterr()
        assert "sweep: 3 runs, 0 finished, 3 to do" in captured.err
        planned = [line.split() for line in captured.out.splitlines()]
        value = lambda words, flag: words[words.index(flag) + 1]
        assert [tuple(value(a, flag) for flag in ("--dataset", "--shots", "--seed", "--eval_on")) for a in planned] == [
            ("imagenet", "16", str(seed), targets) for seed in (1, 2, 3)]
    assert not (tmp_path / "o").exists()


def test_the_source_trains_once_and_the_domain_pass_only_adds_its_targets(transfer):
    out, folder, after_cross = transfer
    r = json.loads((folder / "result.json").read_text())
    assert r["iterations"] == 2 and r["dataset"] == "imagenet"
    assert r["eval_on"] == {t: json.loads((folder / "eval_on" / f"{t}.json").read_text())["accuracy"]
                            for t in ("dtd", "eurosat")}  # the targets of the training pass
    assert (folder / "train.log").read_text().count("lora on cpu") == 1  # one training
    now = stamps(out / "tiny-vit")
    assert {p: v for p, v in now.items() if p in after_cross and p.name != "eval.log"} == {
        p: v for p, v in after_cross.items() if p.name != "eval.log"}  # result, log, adapters, cross targets kept
    added = sorted(p.name for p in set(now) - set(after_cross))
    assert added == sorted(["eval.log", *(f"{v}.json" for v in VARIANTS)])
    assert sorted(p.stem for p in (folder / "eval_on").iterdir()) == sorted(["dtd", "eurosat", *VARIANTS])


def test_recorded_target_accuracies_are_the_loaded_adapters_scored_directly(root, transfer):
    _, folder, _ = transfer
    model = adapted(folder)
    pretrained = build_clip("tiny-vit", None, CPU, seed=0).model
    differs = False
    for target in ("dtd", "eurosat", *VARIANTS):
        record = json.loads((folder / "eval_on" / f"{target}.json").read_text())
        dataset = build_test_dataset(target, root)
        assert record["classes"] == len(dataset.classnames) == {"eurosat": 3, "imagenet_a": 3, "imagenet_r": 3}.get(
            target, 6)  # A and R: their own (here 3 of 6) classes' prompts
        assert record["test_images"] == len(dataset.test) and record["source_dataset"] == "imagenet"
        assert record["accuracy"] == pytest.approx(scored(model, dataset))
        assert record["zero_shot_accuracy"] == pytest.approx(scored(pretrained, dataset))
        differs |= record["accuracy"] != record["zero_shot_accuracy"]
    assert differs  # the adapters change some prediction: the comparison has teeth


def test_the_same_sweeps_again_do_nothing_and_a_lost_target_is_evaluated_alone(capsys, root, transfer, tmp_path):
    out, folder, _ = transfer
    out_copy = tmp_path / "copy"
    shutil.copytree(out, out_copy)
    copy_folder = out_copy / folder.relative_to(out)
    before = stamps(out_copy / "tiny-vit")
    for protocol in ("cross_dataset", "domain"):
        err = run_sweep(capsys, *sweep_args(root, out_copy, protocol, "--shots", "1"))
        assert "sweep: 1 runs, 1 finished, 0 to do" in err
    assert stamps(out_copy / "tiny-vit") == before
    lost = copy_folder / "eval_on" / "eurosat.json"
    recorded = json.loads(lost.read_text())["accuracy"]
    lost.unlink()
    err = run_sweep(capsys, *sweep_args(root, out_copy, "cross_dataset", "--shots", "1", "--jobs", "2"))
    assert "1 runs, 0 finished, 1 to do (1 to evaluate only)" in err and "(trained: evaluating on eurosat)" in err
    assert json.loads(lost.read_text())["accuracy"] == recorded
    changed = {p for p, v in stamps(out_copy / "tiny-vit").items() if before.get(p) != v}
    assert changed == {lost, copy_folder / "eval.log"}
    log = out_copy / "sweep_logs" / "tiny-vit_imagenet_1shots_seed1_lora.eval_on.out"  # beside the training's
    assert f"eval only: eurosat: top-1 {recorded:.2f}%" in log.read_text()


def test_a_slurm_task_evaluates_a_lost_target_and_then_counts_the_run_finished(capsys, root, transfer, tmp_path):
    out, script = tmp_path / "copy", tmp_path / "sweep.sbatch"
    shutil.copytree(transfer[0], out)
    lost = out / transfer[1].relative_to(transfer[0]) / "eval_on" / "dtd.json"
    recorded = json.loads(lost.read_text())["accuracy"]
    lost.unlink()
    err = run_sweep(capsys, *sweep_args(root, out, "cross_dataset", "--shots", "1", "--slurm", script))
    assert "1 to do (1 to evaluate only)" in err and '"$folder" dtd eurosat; then' in script.read_text()
    task = lambda: subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"},
                                  capture_output=True, text=True, timeout=300)
    first = task()
    assert first.returncode == 0 and json.loads(lost.read_text())["accuracy"] == recorded, first.stderr
    second = task()
    assert second.returncode == 0 and second.stdout.startswith("finished already: "), second.stderr


def test_transfer_tables_cells(capsys, transfer):
    out, folder, _ = transfer
    source = json.loads((folder / "result.json").read_text())["accuracy"]
    acc = {p.stem: json.loads(p.read_text())["accuracy"] for p in (folder / "eval_on").iterdir()}
    rows = csv_rows(capsys, out, "--protocol", "cross_dataset")
    assert rows[0][:2] == ["Method", "ImageNet (source)"] and len(rows[0]) == 13 and rows[0][-1] == "Average"
    lora = next(row for row in rows if row[0] == "CLIP-LoRA (ours, lora)")
    columns = dict(zip(rows[0], lora))
    assert columns["ImageNet (source)"] == f"{source:.2f}"
    assert (columns["DTD"], columns["EuroSAT"], columns["Caltech"]) == (f"{acc['dtd']:.2f}", f"{acc['eurosat']:.2f}",
                                                                        "—")
    assert columns["Average"] == f"{statistics.fmean([acc['dtd'], acc['eurosat']]):.2f} [2/10 datasets]"
    rows = csv_rows(capsys, out, "--protocol", "domain")
    assert rows[0] == ["Method", "ImageNet (source)", "ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R",
                       "Average"]
    lora = next(row for row in rows if row[0] == "CLIP-LoRA (ours, lora)")
    assert lora[1:] == [f"{source:.2f}", *(f"{acc[v]:.2f}" for v in VARIANTS),
                        f"{statistics.fmean(acc[v] for v in VARIANTS):.2f}"]


def test_every_record_names_its_method_as_the_tables_show_it(base2new, transfer):
    """result.json (few-shot and base-to-new) and each eval_on/<target>.json carry the method's display name,
    citation and kind: the tables read them there, not from the method registry."""
    shown = {"display_name": "CLIP-LoRA", "citation": get_method("lora").citation, "kind": "weights"}
    records = [*base2new.rglob("result.json"), transfer[1] / "result.json", *(transfer[1] / "eval_on").glob("*.json")]
    assert len(records) == 2 + 1 + 6  # two dtd runs; the ImageNet source and its six targets
    for path in records:
        assert {key: json.loads(path.read_text())[key] for key in shown} == shown, path


# ---- runs another process holds ----------------------------------------------------------------------------
def test_a_claimed_run_is_left_to_its_holder(capsys, root, transfer, tmp_path, monkeypatch):
    out = transfer[0]
    held = out / "tiny-vit" / "imagenet" / "1shots" / "seed2" / "lora"
    held.mkdir(parents=True)
    args = sweep_args(root, out, "cross_dataset", "--shots", "1", seeds=("--seeds", "1 2"))
    with claim(held) as holder:
        err = run_sweep(capsys, "--dry_run", *args)
        assert "sweep: 2 runs, 1 finished, 1 running elsewhere, 0 to do" in err
        assert f"sweep: running elsewhere lora imagenet 1-shot seed 2 ({holder.describe()}); not run here" in err
        assert capsys.readouterr().out == ""
        # planned as pending (claimed just after planning): the runner finds the claim, the sweep says so
        monkeypatch.setattr(sweep, "standing", lambda runs: Standing(pending=[r for r in runs if not is_complete(r)]))
        err = run_sweep(capsys, *args)
        assert "skipped, running elsewhere" in err and "sweep: running elsewhere lora imagenet 1-shot seed 2 " \
            "(claimed by another process; not run here)" in err and "sweep: done; 1 running elsewhere" in err
    assert sorted(p.name for p in held.iterdir()) == [".claim"]  # nothing of the run written by this sweep


# ---- bad input: one line, non-zero exit, nothing written --------------------------------------------------
@pytest.fixture
def damaged(root, tmp_path):
    """A copy of the data with three-class DTD (too few for two halves of 2), Sketch's classnames.txt gone and V2's
    folder 2 gone."""
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "dtd")
    write_synthetic_dataset(copy, "dtd", num_classes=3, train_per_class=4, val_per_class=4, test_per_class=3,
                            image_size=32)
    (copy / "imagenet-sketch" / "classnames.txt").unlink()
    shutil.rmtree(copy / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "2")
    return copy


@pytest.mark.parametrize("args, expect", [
    (["--dataset", "imagenet", "--eval_on", "food101"], "dataset folder not found: {data}/food-101"),
    (["--dataset", "dtd", "--protocol", "base2new"], "base-to-new needs at least 2 classes in each half, 4 in all "
                                                     "(a half of one class scores 100% whatever the model does); "
                                                     "dtd has 3"),
    (["--dataset", "imagenet", "--eval_on", "imagenet_sketch"], "class-name file not found: "
                                                                "{data}/imagenet-sketch/classnames.txt"),
    (["--dataset", "imagenet", "--eval_on", "dtd,imagenetv2"], "class folder not found: {data}/imagenetv2/"
                                                               "imagenetv2-matched-frequency-format-val/2"),
    (["--dataset", "eurosat", "--protocol", "base2new", "--eval_on", "imagenet_a"],
     "--eval_on evaluates a few-shot run on other datasets; a base2new run is evaluated by its protocol"),
    (["--dataset", "imagenet", "--eval_on", "eurosat,imagenet"], "--eval_on imagenet: the run's own dataset"),
])
def test_bad_runs_are_one_line_and_write_nothing(capsys, damaged, tmp_path, args, expect):
    out = tmp_path / "out"
    code = main_run(["--method", "lora", "--root_path", str(damaged), "--output_dir", str(out), "--backbone",
                     "tiny-vit", "--shots", "2", "--quiet", *args, *RUN_ARGS])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and expect.format(data=damaged) in err, err
    assert not out.exists()


def test_a_bad_target_of_a_finished_run_writes_nothing(capsys, damaged, transfer, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(transfer[0], out)
    folder = out / transfer[1].relative_to(transfer[0])
    for variant in ("imagenet_sketch", "imagenetv2"):  # not evaluated yet: the damaged copies are read
        (folder / "eval_on" / f"{variant}.json").unlink()
    before = stamps(out)
    for target in ("food101", "imagenet_sketch", "imagenetv2", "imagenet_r,food101"):
        code = main_run(["--method", "lora", "--dataset", "imagenet", "--root_path", str(damaged), "--output_dir",
                         str(out), "--backbone", "tiny-vit", "--shots", "1", "--quiet", "--eval_on", target,
                         *RUN_ARGS])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert stamps(out) == before


@pytest.mark.parametrize("protocol, options, expect", [
    ("base2new", ["--datasets", "dtd"], "--protocol base2new: base-to-new needs at least 2 classes in each half, "
                                        "4 in all (a half of one class scores 100% whatever the model does); "
                                        "dtd has 3"),
    ("domain", [], "--eval_on imagenetv2: class folder not found: {data}/imagenetv2/"),
    ("domain", ["--eval_on", "imagenet_a imagenet_sketch"], "--eval_on imagenet_sketch: class-name file not found: "
                                                            "{data}/imagenet-sketch/classnames.txt"),
    ("cross_dataset", ["--eval_on", "food101"], "--eval_on food101: dataset folder not found: {data}/food-101"),
    ("cross_dataset", ["--eval_on", "imagenet"], "--eval_on imagenet: the runs train on it"),
    ("cross_dataset", ["--datasets", "dtd"], "--protocol cross_dataset trains on --source (default imagenet)"),
    ("cross_dataset", ["--source", "imagenet_r"], "--source imagenet_r: imagenet_r is a test-only dataset"),
    ("base2new", ["--eval_on", "eurosat"], "--eval_on evaluates few-shot runs on other datasets"),
    ("fewshot", ["--source", "imagenet"], "--source is the training dataset of --protocol cross_dataset or domain"),
    ("fewshot", ["--grid", "protocol=base2new"], "--grid protocol: set protocol with the sweep's own option"),
    ("nope", [], "argument --protocol: invalid choice: 'nope' (choose from 'fewshot', 'base2new', "
                 "'cross_dataset', 'domain') (see --help)"),
])
def test_bad_sweeps_are_one_line_and_run_nothing(capsys, damaged, tmp_path, protocol, options, expect):
    out = tmp_path / "out"
    code = sweep.main(sweep_args(damaged, out, protocol, *options))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("sweep: error: "), err
    assert expect.format(data=damaged) in err, err
    assert not out.exists()


def test_protocol_and_eval_on_belong_to_the_sweep_not_to_the_runs(capsys, root, tmp_path):
    for extra, expect in ((["--eval_on", "dtd"], "--eval_on after '--': give it to the sweep"),
                          (["--protocol", "base2new"], "lora imagenet 16-shot seed 1: its config sets protocol "
                                                       "base2new")):
        code = sweep.main(sweep_args(root, tmp_path / "o", "cross_dataset") + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and expect in err, err


def test_retraining_drops_the_other_datasets_scores_of_the_adapters_it_replaces(capsys, root, tmp_path):
    """--overwrite trains new adapters: the eval_on/ files of the old ones must not read as the new run's."""
    args = ["--method", "lora", "--backbone", "tiny-vit", "--dataset", "imagenet", "--shots", "1", "--root_path",
            str(root), "--output_dir", str(tmp_path), "--quiet", *RUN_ARGS]
    assert main_run(args + ["--eval_on", "dtd"]) == 0
    folder = tmp_path / "tiny-vit" / "imagenet" / "1shots" / "seed1" / "lora"
    assert (folder / "eval_on" / "dtd.json").is_file()
    assert main_run(args + ["--overwrite", "--lr", "0.01"]) == 0  # other adapters, no --eval_on this time
    assert not (folder / "eval_on").exists()
    assert main_run(args + ["--lr", "0.01", "--eval_on", "dtd"]) == 0  # evaluated again, on the new adapters
    assert json.loads((folder / "eval_on" / "dtd.json").read_text())["target"] == "dtd"
    capsys.readouterr()
