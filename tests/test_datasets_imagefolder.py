"""``imagefolder``: a researcher's own class folders, split once 50/20/30 and drawn like the benchmarks.

The split is checked against an independent re-implementation of CoOp's
``read_and_split_data`` rule with ``random.Random(0)``, and the few-shot draw
against CLIP-LoRA's sampling on the written JSON.
"""

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import clip_lora_draw
from datasets import DatasetError, build_dataset, write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLIT = "split_imagefolder.json"


def own_folder(root: Path) -> Path:
    """Five classes of 15 images, plus what real folders hold: odd extensions, notes, hidden files."""
    write_synthetic_dataset(root, "imagefolder", num_classes=5, train_per_class=9, val_per_class=3,
                            test_per_class=3, image_size=8)
    cls = root / "red_stripes"
    (cls / "red_stripes_0001.jpg").rename(cls / "red_stripes_0001.JPG")
    (cls / "red_stripes_0002.jpg").rename(cls / "red_stripes_0002.Png")
    (cls / "notes.txt").write_text("not an image")
    (cls / ".DS_Store").write_bytes(b"\0")
    (cls / "._red_stripes_0003.jpg").write_bytes(b"\0")
    (cls / "nested").mkdir()
    (root / "README.md").write_text("my birds")
    (root / ".cache").mkdir()
    return root


def reference_split(root: Path):
    """Sorted classes and image files; Random(0) shuffles each class; round(50%) train, round(20%) val."""
    rng = random.Random(0)
    split = {"train": [], "val": [], "test": []}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for label, name in enumerate(classes):
        files = sorted(p.name for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in (".jpg", ".png"))
        rng.shuffle(files)
        n_train, n_val = round(len(files) * 0.5), round(len(files) * 0.2)
        for part, chosen in (("train", files[:n_train]), ("val", files[n_train:n_train + n_val]),
                             ("test", files[n_train + n_val:])):
            split[part] += [[f"{name}/{f}", label, name] for f in chosen]
    return split


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return own_folder(tmp_path_factory.mktemp("own"))


def test_split_is_written_once_as_coop_json_and_reused(folder):
    ds = build_dataset("imagefolder", folder, shots=2, seed=1)
    content = json.loads((folder / SPLIT).read_text())
    assert content == reference_split(folder)
    assert [len(content[p]) for p in ("train", "val", "test")] == [40, 15, 20]  # 15 images: 8 / 3 / 4 per class
    listed = {entry[0] for part in ("train", "val", "test") for entry in content[part]}
    assert {"red_stripes/red_stripes_0001.JPG", "red_stripes/red_stripes_0002.Png"} <= listed
    assert len(listed) == 75 and not any("notes" in path or "/." in path for path in listed)
    assert ds.classnames == ["blue checks", "green dots", "purple rings", "red stripes", "yellow waves"]
    assert ds.dataset_dir == folder and ds.test == build_dataset("imagefolder", folder, shots=8, seed=5).test
    written = (folder / SPLIT).stat().st_mtime_ns
    build_dataset("imagefolder", folder, shots=1, seed=3)
    assert (folder / SPLIT).stat().st_mtime_ns == written  # the run seed does not re-split
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["README.md", SPLIT]  # no temp files left


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_draw_equals_clip_lora_and_counts(folder, shots):
    content = reference_split(folder)
    for seed in (1, 2, 3):
        ds = build_dataset("imagefolder", folder, shots=shots, seed=seed)
        state = random.getstate()
        random.seed(seed)
        val, train = clip_lora_draw(content["val"], min(shots, 4)), clip_lora_draw(content["train"], shots)
        random.setstate(state)
        assert [(d.impath, d.label) for d in ds.val] == [(str(folder / e[0]), e[1]) for e in val]
        assert [(d.impath, d.label) for d in ds.train_x] == [(str(folder / e[0]), e[1]) for e in train]
        assert Counter(d.label for d in ds.train_x) == {label: shots for label in range(5)}
        assert Counter(d.label for d in ds.val) == {label: min(shots, 4) for label in range(5)}


def test_changed_folder_is_refused(tmp_path):
    root = own_folder(tmp_path)
    build_dataset("imagefolder", root, shots=1, seed=1)
    (root / "green_dots" / "extra.jpeg").write_bytes((root / "green_dots" / "green_dots_0001.jpg").read_bytes())
    with pytest.raises(DatasetError, match=rf"^images in {root} changed since {root / SPLIT} was written \(1 added, "
                                           rf"0 removed, e.g. green_dots/extra.jpeg\); delete {root / SPLIT} to split"):
        build_dataset("imagefolder", root, shots=1, seed=1)
    (root / "green_dots" / "extra.jpeg").unlink()
    (root / "blue_checks" / "blue_checks_0004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"\(0 added, 1 removed, e.g. blue_checks/blue_checks_0004.jpg\)"):
        build_dataset("imagefolder", root, shots=1, seed=1)
    (root / SPLIT).unlink()
    build_dataset("imagefolder", root, shots=1, seed=1)
    content = json.loads((root / SPLIT).read_text())
    assert [len(content[p]) for p in ("train", "val", "test")] == [39, 15, 20]  # 14 images: 7 / 3 / 4


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"^root_path not found: .*nowhere \(expected a directory holding one"):
        build_dataset("imagefolder", tmp_path / "nowhere", shots=1, seed=1)
    with pytest.raises(DatasetError, match=rf"^no class folders in {tmp_path} \(expected one sub-folder"):
        build_dataset("imagefolder", tmp_path, shots=1, seed=1)
    root = own_folder(tmp_path / "own")
    (root / "empty").mkdir()
    (root / "empty" / "labels.csv").write_text("a,b")
    with pytest.raises(DatasetError, match=rf"^class folder has no images: {root / 'empty'} \(expected .jpg"):
        build_dataset("imagefolder", root, shots=1, seed=1)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / "empty" / name).write_bytes((root / "green_dots" / "green_dots_0001.jpg").read_bytes())
    with pytest.raises(DatasetError, match=rf"^class folder {root / 'empty'} has 3 images; the 50/20/30 "
                                           r"train/val/test split needs at least 4$"):
        build_dataset("imagefolder", root, shots=1, seed=1)
    assert not (root / SPLIT).exists()


def test_check_does_not_write_the_split(tmp_path):
    root = own_folder(tmp_path)

    def check():
        return subprocess.run([sys.executable, "-m", "datasets.check", "--root_path", str(root), "--dataset",
                               "imagefolder"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"split file: {root / SPLIT} (not written yet" in result.stdout and not (root / SPLIT).exists()
    assert "classes: 5" in result.stdout and "train: 40 images, 5 classes, fewest per class: 8" in result.stdout
    build_dataset("imagefolder", root, shots=1, seed=1)
    assert f"{root / SPLIT} (reused)" in check().stdout
    (root / "yellow_waves" / "yellow_waves_0002.jpg").unlink()
    result = check()
    assert result.returncode == 1 and "imagefolder: images in" in result.stdout and "1 removed" in result.stdout


def test_two_image_folders_are_two_datasets_in_results_and_tables(tmp_path, capsys):
    """The folder is the dataset: runs on two folders get their own run folders and table columns."""
    import main
    from scripts import make_table

    out = tmp_path / "out"
    accuracy = {}
    for name in ("birds", "cars"):
        root = own_folder(tmp_path / name)
        code = main.run(["--method", "lora", "--dataset", "imagefolder", "--root_path", str(root), "--shots", "1",
                         "--backbone", "tiny-vit", "--n_iters", "2", "--batch_size", "4", "--num_workers", "0",
                         "--eval_batch_size", "16", "--threads", "1", "--output_dir", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
        label = f"imagefolder-{name}-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]}"  # name + path
        result = json.loads((out / f"tiny-vit/{label}/1shots/seed1/lora/result.json").read_text())
        assert result["dataset"] == label and result["config"]["root_path"] == str(root)
        accuracy[name] = result["accuracy"], label
    capsys.readouterr()
    assert make_table.main([str(out), "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert f"Method,{accuracy['birds'][1]} 1-shot,{accuracy['cars'][1]} 1-shot,Average 1-shot" in table
    assert f'"CLIP-LoRA (ours, lora)",{accuracy["birds"][0]:.2f},{accuracy["cars"][0]:.2f},' in table
