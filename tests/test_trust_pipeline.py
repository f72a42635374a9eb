"""Nothing wrong is ever recorded as finished, end to end through the command line (issue 20's cases).

Each test runs ``main.py``'s ``lora_zoo.cli.run`` in this process, or ``main.py`` and ``scripts/sweep.py``
subprocesses where a second process is the point (a claim held by another process, a ``kill -9``), on the
tiny-vit backbone (random init) or tiny-clip (this project's pretrained tiny CLIP, whose zero-shot accuracy
moves when images move), small synthetic data and a few iterations. A process that must stay in the middle
of its training while another acts is frozen with SIGSTOP, so no test depends on the machine's speed.
"""
import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, one_line
import torch
from PIL import Image
from safetensors.torch import load_file

import lora_zoo.checkpoint
import lora_zoo.experiment
import lora_zoo.stages
from datasets import build_dataset, write_synthetic_dataset
from datasets.scenes import write_task
from lora_zoo.runlock import claimed_by
from scripts import make_table, sweep

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TINY = ["--backbone", "tiny-vit", "--shots", "1", "--batch_size", "4", "--num_workers", "0", "--eval_batch_size", "16",
        "--quiet"]
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: \S.*")
pytestmark = pytest.mark.usefixtures("one_thread")


def result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def run_folder(out, dataset="dtd", leaf="lora", backbone="tiny-vit", seed=1) -> Path:
    return Path(out, backbone, dataset, "1shots", f"seed{seed}", leaf)


def flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes where they sit in ``path`` (a disk or a copy gone wrong)."""
    data, needle = bytearray(path.read_bytes()), tensor.numpy().tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def scenes(root: Path) -> Path:
    """The demo's Compose task under ``root``, small: 10 classes, 1 train, 1 val and 3 test images each, 48 px
    (tiny-clip scores 43% zero-shot on it); returns its folder (``images/<class>/*.png`` and the split)."""
    return write_task(root, "compose", train_per_class=1, val_per_class=1, test_per_class=3, image_size=48)


TINY_CLIP = ["--backbone", "tiny-clip", "--shots", "1", "--n_iters", "2", "--batch_size", "4", "--num_workers", "0",
             "--eval_batch_size", "32", "--quiet"]


# ---- finite or not finished ---------------------------------------------------------------------------------------
def test_a_diverging_run_stops_naming_its_iteration_and_lr_and_records_nothing(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, "--method", "lora", *TINY, "--root_path", data_root, "--output_dir", out, "--lr", "1e6",
                    "--n_iters", "2")
    line = one_line(err)
    assert code == 1 and re.fullmatch(r"error: .* not finite after iteration 2/2 \(lr 1e\+06\);.*\(try a lower lr\)",
                                      line), line
    folder = run_folder(out)
    assert not any((folder / name).exists() for name in ("result.json", "adapters.safetensors", "checkpoint.pt"))
    code, err = cli(capsys, "--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "far",
                    "--lr", "1e38", "--n_iters", "2")  # overflows AdamW's first step: refused by the config
    assert code == 1 and one_line(err).startswith("error: lr must be small enough for AdamW's first step")
    assert "1e+38" in err and not (tmp_path / "far").exists()


def test_best_over_lr_never_picks_a_diverged_run_and_random_init_zero_shot_is_not_called_pretrained(
        data_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = sweep.main(["--root_path", str(data_root), "--output_dir", str(out), "--backbone", "tiny-vit", "--methods",
                       "lora", "--datasets", "dtd", "--shots", "1", "--seeds", "1", "--grid", "lr=1e-3,1e6", "--",
                       *TINY[2:], "--n_iters", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "sweep: 1 of 2 runs failed" in err and "(lr 1e+06)" in err
    assert (run_folder(out, leaf="lora-lr=0.001") / "result.json").is_file()
    assert not (run_folder(out, leaf="lora-lr=1000000.0") / "result.json").exists()
    assert make_table.main([str(out), "--format", "csv", "--best_over", "lr"]) == 0
    table = capsys.readouterr().out
    rows = {row[0]: row[1:] for row in csv.reader(table.split("\n\n", 1)[1].splitlines()) if row}
    accuracy = f"{result(run_folder(out, leaf='lora-lr=0.001'))['accuracy']:.2f}"
    assert rows["best lr per cell, selected on the test split: CLIP-LoRA (ours, lora)"] == [f"{accuracy} (lr=0.001)",
                                                                                             accuracy]
    assert "1000000" not in table and "1e+06" not in table and "nan" not in table.lower()
    zero_shot = f"{result(run_folder(out, leaf='lora-lr=0.001'))['zero_shot_accuracy']:.2f}"
    assert rows["Zero-shot (random init, no training)"] == [zero_shot, zero_shot]  # tiny-vit: pretrained null
    assert not any("pretrained model" in label for label in rows)


# ---- caches keyed on content ------------------------------------------------------------------------------------
def test_swapped_test_images_are_scored_as_they_are_now_by_both_caches(tmp_path, capsys):
    data = scenes(tmp_path / "data").parent
    out, test_cache = tmp_path / "out", tmp_path / "test_cache"
    args = ["--method", "lora", *TINY_CLIP, "--dataset", "scenes_compose", "--root_path", data]
    folder, cached_folder = run_folder(out, "scenes_compose", backbone="tiny-clip"), \
        run_folder(out, "scenes_compose", "lora-cached", backbone="tiny-clip")
    assert cli(capsys, *args, "--output_dir", out)[0] == 0
    assert cli(capsys, *args, "--output_dir", out, "--test_cache_dir", test_cache, "--run_name", "cached")[0] == 0
    before = result(folder)
    assert result(cached_folder)["zero_shot_cached"] is True
    assert result(cached_folder)["accuracy"] == before["accuracy"]
    test = build_dataset("scenes_compose", data, shots=1).test
    first, second = ([d.impath for d in test if d.label == label] for label in (0, 1))
    for a, b in zip(first, second):  # mv: the two classes' test images swapped, every file name kept
        os.rename(a, a + ".swap")
        os.rename(b, a)
        os.rename(a + ".swap", b)

    assert cli(capsys, *args, "--output_dir", out, "--overwrite")[0] == 0
    assert cli(capsys, *args, "--output_dir", tmp_path / "fresh")[0] == 0  # no cache at all
    assert cli(capsys, *args, "--output_dir", out, "--test_cache_dir", test_cache, "--run_name", "cached",
               "--overwrite")[0] == 0
    after, fresh = result(folder), result(run_folder(tmp_path / "fresh", "scenes_compose", backbone="tiny-clip"))
    assert after["zero_shot_cached"] is False and fresh["zero_shot_cached"] is False
    assert after["zero_shot_accuracy"] == fresh["zero_shot_accuracy"] != before["zero_shot_accuracy"]
    assert after["accuracy"] == fresh["accuracy"] != before["accuracy"]  # the swap moves the true number
    assert result(cached_folder)["accuracy"] == fresh["accuracy"]  # the preprocessed test cache was rebuilt
    assert len(list(test_cache.glob("*.npy"))) == 2


# ---- run identity includes the data --------------------------------------------------------------------------------
def test_two_folders_of_one_name_are_two_runs_and_adapters_are_not_scored_on_other_images(tmp_path, capsys):
    args = ["--method", "lora", "--dataset", "imagefolder", *TINY, "--n_iters", "2", "--output_dir", tmp_path / "out"]
    for part, seed in (("a", 1), ("b", 2)):
        write_synthetic_dataset(tmp_path / part / "birds", "imagefolder", num_classes=3, train_per_class=4,
                                val_per_class=1, test_per_class=2, image_size=32, seed=seed)
        code, err = cli(capsys, *args, "--root_path", tmp_path / part / "birds")
        assert code == 0 and err == ""  # the second folder trains: it is not "nothing to do"
    folders = sorted((tmp_path / "out" / "tiny-vit").iterdir())
    assert [re.fullmatch(r"imagefolder-birds-[0-9a-f]{8}", f.name) is not None for f in folders] == [True, True]
    roots = {result(f / "1shots" / "seed1" / "lora")["config"]["root_path"] for f in folders}
    assert roots == {str(tmp_path / "a" / "birds"), str(tmp_path / "b" / "birds")}

    split_file = tmp_path / "a" / "birds" / "split_imagefolder.json"  # the first class's train and val images
    split = json.loads(split_file.read_text())                          # traded: another few-shot draw
    train, val = (next(i for i, e in enumerate(split[part]) if e[1] == 0) for part in ("train", "val"))
    split["train"][train], split["val"][val] = split["val"][val], split["train"][train]
    split_file.write_text(json.dumps(split))
    folder = next(f for f in folders if result(f / "1shots/seed1/lora")["config"]["root_path"].startswith(
        str(tmp_path / "a"))) / "1shots" / "seed1" / "lora"
    files = sorted(p.name for p in folder.iterdir())
    code, err = cli(capsys, *args, "--root_path", tmp_path / "a" / "birds", "--eval_only")
    assert code == 1 and one_line(err).startswith(f"error: the adapters at {folder} were trained on other images "
                                                  "than this run's few-shot set (train_subset_sha1 ")
    assert sorted(p.name for p in folder.iterdir()) == files  # no eval.json, no eval.log


# ---- one run, one owner --------------------------------------------------------------------------------------------
def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists (written atomically: complete), while ``proc`` runs; then freeze ``proc``."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)


def test_a_claimed_run_is_skipped_and_a_killed_one_is_taken_over_and_resumed_once(data_root, tmp_path, capsys,
                                                                                    monkeypatch):
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "out", "--n_iters", "300",
            "--checkpoint_every", "10"]
    folder = run_folder(tmp_path / "out")
    first = start("main.py", *args)
    try:
        wait_for(folder / "checkpoint.pt", first)  # frozen while it trains, holding its claim
        log = (folder / "train.log").read_bytes()
        skipped = f"skipped, running elsewhere: {folder} is being trained elsewhere ({claimed_by(folder).describe()})"
        assert f"pid {first.pid}," in skipped
        with monkeypatch.context() as patch:  # seen at once: skipped before any data is read
            patch.setattr(lora_zoo.stages, "prepare_data", lambda *a: pytest.fail("read the data of a claimed run"))
            code, err = cli(capsys, *args)
        assert code == 0 and one_line(err) == skipped and (folder / "train.log").read_bytes() == log
        with monkeypatch.context() as patch:  # claimed between that look and our claim: the claim decides
            patch.setattr(lora_zoo.experiment, "check_unclaimed", lambda out: None)
            code, err = cli(capsys, *args)
        assert code == 0 and one_line(err) == skipped and (folder / "train.log").read_bytes() == log
        first.kill()  # kill -9
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= checkpoint < 300 and not (folder / "result.json").exists()
    assert cli(capsys, *args)[0] == 0  # taken over from the dead process's claim
    finished = result(folder)
    assert (finished["iterations"], finished["resumed_from"]) == (300, checkpoint)
    assert len(finished["loss_history"]) == 20 and not (folder / "checkpoint.pt").exists()
    text = (folder / "train.log").read_text()
    assert text.encode().startswith(log)  # the first process's lines, then ours: never interleaved
    lines = text.splitlines()
    assert all(LOG_LINE.fullmatch(line) for line in lines), [line for line in lines if not LOG_LINE.fullmatch(line)]
    assert sum(" | lora on cpu " in line for line in lines) == 2  # the killed run's header and ours
    resumed = [line.split(": ", 1)[1] for line in lines if "resuming" in line]
    assert resumed == [f"resuming at iteration {checkpoint}/300"]
    assert sum("-> top-1" in line for line in lines) == 1 and lines[-1].endswith(finished["summary"])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "adapters.json", "adapters.safetensors", "curves.csv", "result.json", "train.log"]


def test_two_sweeps_on_one_output_folder_train_every_run_exactly_once(data_root, tmp_path, capsys):
    """Sweep A is frozen in its first run's training, its checkpoint written; sweep B meanwhile skips that run and
    trains the other three; A, thawed, finishes its run and finds the others finished by B."""
    out = tmp_path / "out"
    argv = ["--root_path", data_root, "--output_dir", out, "--backbone", "tiny-vit", "--methods", "lora",
            "--datasets", "dtd", "--shots", "1", "--seeds", "1", "2", "--grid", "lr=1e-4,2e-4", "--", *TINY[2:],
            "--n_iters", "40", "--checkpoint_every", "5"]
    folders = [run_folder(out, leaf=f"lora-lr={lr}", seed=seed) for seed in (1, 2) for lr in ("0.0001", "0.0002")]
    sweep_a = start("scripts/sweep.py", *argv)
    try:
        wait_for(folders[0] / "checkpoint.pt", sweep_a)
        assert sweep.main([str(a) for a in argv]) == 0  # sweep B, in this process
        captured = capsys.readouterr()
        os.kill(sweep_a.pid, signal.SIGCONT)
        a_out, a_err = sweep_a.communicate(timeout=300)
    finally:
        if sweep_a.poll() is None:
            sweep_a.kill()
            sweep_a.communicate()
    assert sweep_a.returncode == 0, a_err
    # sweep B sees A's claim when it plans (the runner would skip it too, had A claimed it later)
    assert "sweep: running elsewhere lora dtd 1-shot seed 1 [lr=0.0001]" in captured.err
    assert f"pid {sweep_a.pid}," in captured.err and "1 running elsewhere, not run here" in captured.err
    assert a_err.count("nothing to do, run already finished") == 3
    trained_by_a = [line.rsplit(" | ", 1)[1] for line in a_out.splitlines()]
    trained_by_b = [line.rsplit(" | ", 1)[1] for line in captured.out.splitlines()]
    assert trained_by_a == [str(folders[0])] and trained_by_b == list(map(str, folders[1:]))
    for folder in folders:
        text = (folder / "train.log").read_text()
        assert text.count(" | lora on cpu ") == 1 and "resuming" not in text, folder
        assert all(LOG_LINE.fullmatch(line) for line in text.splitlines())
        assert result(folder)["iterations"] == 40 and result(folder)["resumed_from"] == 0


# ---- damaged files, a full disk ------------------------------------------------------------------------------------
def test_eval_only_refuses_adapters_with_a_flipped_byte_in_one_line(data_root, tmp_path, capsys):
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--output_dir", tmp_path / "out", "--n_iters", "2"]
    assert cli(capsys, *args)[0] == 0
    folder = run_folder(tmp_path / "out")
    adapters = folder / "adapters.safetensors"
    tensors = load_file(adapters)
    flip_inside(adapters, tensors[next(name for name in sorted(tensors) if name.endswith("lora_B"))])
    code, err = cli(capsys, *args, "--eval_only")
    assert code == 1 and one_line(err) == (f"error: adapter file {adapters} does not match the sha256 recorded in "
                                           "adapters.json (damaged, truncated or replaced since it was saved); "
                                           "restore it or train the run again")
    assert not (folder / "eval.json").exists() and not (folder / "eval.log").exists()


def fill_the_disk_at_the_adapters(monkeypatch):
    """The disk is full when the trained adapters are written: safetensors' writer fails as a full disk does."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(lora_zoo.checkpoint, "save_file", no_space)


def test_a_full_disk_at_the_end_keeps_the_trained_adapters_and_the_same_command_finishes(data_root, tmp_path, capsys,
                                                                                         monkeypatch):
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--n_iters", "3"]
    folder = run_folder(tmp_path / "out")
    with monkeypatch.context() as patch:
        fill_the_disk_at_the_adapters(patch)
        code, err = cli(capsys, *args, "--output_dir", tmp_path / "out")
    assert code == 1 and one_line(err) == (
        f"error: cannot write {folder / 'adapters.safetensors'}: No space left on device; the trained adapters are "
        f"kept in {folder / 'checkpoint.pt'}: free space and run the same command again to finish from it without "
        "training")
    assert sorted(p.name for p in folder.iterdir()) == [".claim", "checkpoint.pt", "curves.csv", "train.log"]
    assert cli(capsys, *args, "--output_dir", tmp_path / "out")[0] == 0
    assert cli(capsys, *args, "--output_dir", tmp_path / "whole")[0] == 0  # never interrupted
    finished, whole = result(folder), result(run_folder(tmp_path / "whole"))
    assert (finished["iterations"], finished["resumed_from"]) == (3, 3)  # not trained again
    for key in ("accuracy", "adapters_sha256", "loss_history", "final_loss"):
        assert finished[key] == whole[key], key


def test_a_checkpoint_with_a_flipped_tensor_is_one_line_asking_to_delete_it(data_root, tmp_path, capsys, monkeypatch):
    args = ["--method", "lora", *TINY, "--root_path", data_root, "--n_iters", "3", "--output_dir", tmp_path / "out"]
    with monkeypatch.context() as patch:
        fill_the_disk_at_the_adapters(patch)
        assert cli(capsys, *args)[0] == 1
    checkpoint = run_folder(tmp_path / "out") / "checkpoint.pt"
    adapters = torch.load(checkpoint, weights_only=True)["adapters"]
    flip_inside(checkpoint, adapters[next(name for name in sorted(adapters) if name.endswith("lora_B"))])
    code, err = cli(capsys, *args)
    assert code == 1 and one_line(err) == (f"error: the run's checkpoint {checkpoint} is damaged (its content does not "
                                           "match the checksum saved with it); delete it to start the run again")
    assert not (checkpoint.parent / "result.json").exists()


# ---- checks before work --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, option", [("lora", "rank"), ("dora", "rank"), ("pissa", "rank"),
                                            ("nora", "outer_rank"), ("adalora", "init_rank")])
def test_a_rank_above_the_layer_width_stops_before_the_zero_shot_pass(method, option, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = cli(capsys, "--method", method, f"--{option}", "1000", *TINY, "--root_path", data_root,
                    "--output_dir", out, "--n_iters", "2")
    assert code == 1 and one_line(err) == (f"error: {method} {option} 1000 exceeds min(d_in, d_out) = 64 of a 64×64 "
                                           "(d_out×d_in) layer (visual.transformer.resblocks.0.attn.q)")
    assert not out.exists()  # no run folder, no zero-shot cache entry


def test_a_corrupt_test_jpeg_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "data", "dtd", num_classes=3, train_per_class=2, val_per_class=1,
                            test_per_class=2, image_size=32)
    broken = Path(build_dataset("dtd", tmp_path / "data", shots=1).test[3].impath)
    broken.write_bytes(broken.read_bytes()[:200])
    code, err = cli(capsys, "--method", "lora", *TINY, "--root_path", tmp_path / "data", "--output_dir",
                    tmp_path / "out", "--n_iters", "2")
    assert code == 1 and one_line(err).startswith(f"error: cannot decode image {broken}: ")
    assert not (tmp_path / "out").exists()


# ---- images as they are --------------------------------------------------------------------------------------------
def test_16_bit_png_images_train_and_score_as_their_8_bit_versions(tmp_path, capsys):
    """The scenes as grey PNGs three ways: 8-bit; 16-bit (mode I;16, the 8-bit value × 257 plus noise that rounds
    away); and the almost white pictures ``convert("RGB")`` makes of the 16-bit ones, which must score otherwise."""
    images = scenes(tmp_path / "scenes") / "images"
    noise = np.random.default_rng(0)
    for path in sorted(images.rglob("*.png")):
        grey = np.asarray(Image.open(path).convert("L")).astype(np.int64)
        deep = np.clip(grey * 257 + noise.integers(-128, 129, grey.shape), 0, 65535).astype(np.uint16)
        for kind in ("eight", "sixteen", "white"):
            (tmp_path / kind / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight" / path.parent.name / path.name)
        Image.fromarray(deep).save(tmp_path / "sixteen" / path.parent.name / path.name)
        with Image.open(tmp_path / "sixteen" / path.parent.name / path.name) as opened:
            assert opened.mode == "I;16"
            opened.convert("RGB").save(tmp_path / "white" / path.parent.name / path.name)
    found = {}
    for kind in ("eight", "sixteen", "white"):
        code, err = cli(capsys, "--method", "lora", *TINY_CLIP, "--dataset", "imagefolder", "--root_path",
                        tmp_path / kind, "--output_dir", tmp_path / "out")
        assert code == 0, err
        folder = next((tmp_path / "out" / "tiny-clip").glob(f"imagefolder-{kind}*"))
        found[kind] = result(folder / "1shots" / "seed1" / "lora")
    assert found["sixteen"]["test_images"] == 20
    for key in ("accuracy", "zero_shot_accuracy", "loss_history"):
        assert found["sixteen"][key] == found["eight"][key], key
    assert found["white"]["loss_history"] != found["eight"]["loss_history"]
    assert found["white"]["zero_shot_accuracy"] != found["eight"]["zero_shot_accuracy"]


# ---- the table's zero-shot row names what it scored ----------------------------------------------------------------
def test_zero_shot_row_says_random_init_pretrained_or_both(tmp_path):
    def plant(dataset, pretrained):
        folder = run_folder(tmp_path / dataset, dataset)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({
            "backbone": "tiny-vit", "method": "lora", "dataset": dataset, "shots": 1, "seed": 1, "accuracy": 50.0,
            "zero_shot_accuracy": 40.0, "config": {"method": "lora", **pretrained}}))
    for dataset, pretrained in (("dtd", {"pretrained": None}), ("food101", {"pretrained": "openai"}),
                                ("eurosat", {})):  # a record without the key: pretrained, as before
        plant(dataset, pretrained)
    layout = make_table.Layout(None, "dataset", None, [1], {1}, ["lora"])
    runs = make_table.load_results(tmp_path)[0]
    labels = {tuple(d): make_table.zero_shot_label(runs, layout, list(d)) for d in (
        ["dtd"], ["food101"], ["eurosat"], ["dtd", "food101"])}
    assert labels == {("dtd",): "Zero-shot (random init, no training)",
                      ("food101",): "Zero-shot (the pretrained model, no training)",
                      ("eurosat",): "Zero-shot (the pretrained model, no training)",
                      ("dtd", "food101"): "Zero-shot (pretrained or random init, no training)"}


def test_readme_reliability_promises_name_tests_that_exist():
    section = (REPO / "README.md").read_text().split("\n## Reliability\n", 1)[1].split("\n## ", 1)[0]
    promises = re.findall(r"^- \*\*(.+?)\*\*", section, flags=re.M)
    assert promises == ["Set up as written", "Nothing written on bad input", "Same numbers from caches", "Resumable",
                        "Concurrent-safe", "Nothing non-finite recorded", "Damaged files refused", "No litter"]
    for promise in section.split("\n- ")[1:]:
        named = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", promise)
        assert len(named) >= 2, promise
        for file, test in named:
            assert f"\ndef {test}(" in (REPO / "tests" / (file or Path(__file__).name)).read_text(), (file, test)
