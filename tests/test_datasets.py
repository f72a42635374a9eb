"""Tests of the ``datasets`` core on synthetic data written in the real on-disk layouts.

Covers the CLIP-LoRA sampler on shuffled and short splits (against an
independent re-implementation), bad-input messages for CoOp split files,
transforms derived from open_clip, the data loader, the synthetic generator
and ``python -m datasets.check``. Every benchmark in both conventions:
``test_datasets_benchmarks.py``; your own folder: ``test_datasets_imagefolder.py``.
"""

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import open_clip  # noqa: E402
from conftest import clip_lora_draw  # noqa: E402
from PIL import Image  # noqa: E402

from datasets import (DatasetError, build_data_loader, build_dataset, build_test_transform,  # noqa: E402
                      build_train_transform, write_synthetic_dataset)
from datasets.loader import TrainStream  # noqa: E402

SPLIT_FILES = {"dtd": "split_zhou_DescribableTextures.json", "food101": "split_zhou_Food101.json",
               "oxford_pets": "split_zhou_OxfordPets.json"}
SMALL = dict(num_classes=5, train_per_class=6, val_per_class=4, test_per_class=3, image_size=32, seed=0)
LAYOUTS = [("food101", "clip_lora"), ("oxford_pets", "coop")]


def write_small(root, dataset="dtd", convention="coop", **overrides):
    return write_synthetic_dataset(root, dataset=dataset, convention=convention, **{**SMALL, **overrides})


def read_json(dataset_dir, dataset):
    return json.loads((Path(dataset_dir) / SPLIT_FILES[dataset]).read_text())


def tiny_clip(image_size=32):
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=image_size, layers=1, width=64, patch_size=8,
                                                        head_width=32),
                          text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=1))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One root per layout in LAYOUTS, written once for the read-only tests."""
    out = {}
    for dataset, convention in LAYOUTS:
        root = tmp_path_factory.mktemp(f"{dataset}_{convention}")
        write_small(root, dataset, convention)
        out[(dataset, convention)] = root
    return out


def test_pets_layout_is_flat(roots):
    image_dir = roots[("oxford_pets", "coop")] / "oxford_pets" / "images"
    files = sorted(p.name for p in image_dir.iterdir())
    assert len(files) == 5 * 13 and all(p.is_file() for p in image_dir.iterdir())
    assert "Red_Stripes_1.jpg" in files


@pytest.mark.parametrize("shots,seed", [(1, 1), (2, 3), (4, 2), (8, 1), (16, 3)])
def test_sampling_matches_reference(tmp_path, shots, seed):
    dataset_dir = write_small(tmp_path, "food101", "coop", train_per_class=10, val_per_class=3)
    splits = read_json(dataset_dir, "food101")
    shuffler = random.Random(123)  # first-appearance order no longer equals label order
    for split in ("train", "val"):
        shuffler.shuffle(splits[split])
    (dataset_dir / SPLIT_FILES["food101"]).write_text(json.dumps(splits))
    random.seed(seed)  # CLIP-LoRA seeds the global RNG, then draws val before train
    expected_val = clip_lora_draw(splits["val"], min(shots, 4))
    expected_train = clip_lora_draw(splits["train"], shots)
    ds = build_dataset("food101", tmp_path, shots=shots, seed=seed)
    image_dir = dataset_dir / "images"
    assert [d.impath for d in ds.val] == [str(image_dir / e[0]) for e in expected_val]
    assert [d.impath for d in ds.train_x] == [str(image_dir / e[0]) for e in expected_train]
    assert [d.label for d in ds.train_x] == [e[1] for e in expected_train]
    first_seen = list(dict.fromkeys(e[1] for e in splits["train"]))
    assert list(dict.fromkeys(d.label for d in ds.train_x)) == first_seen != sorted(first_seen)


def test_short_class_samples_with_replacement_and_warns(tmp_path, caplog):
    write_small(tmp_path, "dtd", "coop", train_per_class=3, val_per_class=2)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = build_dataset("dtd", tmp_path, shots=4, seed=1)
    per_class = Counter(d.label for d in ds.train_x)
    assert per_class == {label: 4 for label in range(5)}
    for label in range(5):
        drawn = [d.impath for d in ds.train_x if d.label == label]
        assert len(set(drawn)) <= 3 < len(drawn)  # repeats
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 10  # 5 classes short in val (2 < 4) and 5 in train (3 < 4)
    assert any("'red stripes'" in m and "3 train images" in m and "4 shots" in m and "replacement" in m
               for m in messages)


def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match=r"root_path not found: .*nowhere"):
        build_dataset("dtd", tmp_path / "nowhere", shots=1, seed=1)
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet21k' \(available: caltech101, dtd, eurosat, "
                                           r"fgvc_aircraft, food101, imagefolder, imagenet, imagenet_a, imagenet_r, "
                                           r"imagenet_sketch, imagenetv2, oxford_flowers, oxford_pets, scenes_compose, "
                                           r"scenes_names, stanford_cars, sun397, ucf101\)"):
        build_dataset("imagenet21k", tmp_path, shots=1, seed=1)
    with pytest.raises(DatasetError, match=rf"^dataset folder not found: {tmp_path}/dtd \(expected {tmp_path}/dtd/ "
                                           rf"holding images/ and split_zhou_DescribableTextures.json or "
                                           rf"{tmp_path}/DTD/ holding images/ and split_zhou_Desc"):
        build_dataset("dtd", tmp_path, shots=1, seed=1)
    dataset_dir = write_small(tmp_path, "dtd", "clip_lora")
    with pytest.raises(DatasetError, match="shots must be an integer >= 1, got 0"):
        build_dataset("dtd", tmp_path, shots=0, seed=1)
    split = dataset_dir / SPLIT_FILES["dtd"]
    split.rename(tmp_path / "saved.json")
    with pytest.raises(DatasetError, match=f"split file not found: {split}"):
        build_dataset("dtd", tmp_path, shots=1, seed=1)
    (tmp_path / "saved.json").rename(split)
    (dataset_dir / "images").rename(dataset_dir / "imgs")
    with pytest.raises(DatasetError, match=f"image folder not found: {dataset_dir / 'images'}"):
        build_dataset("dtd", tmp_path, shots=1, seed=1)
    (dataset_dir / "imgs").rename(dataset_dir / "images")
    assert len(build_dataset("dtd", tmp_path, shots=1, seed=1).test) == 15


def test_bad_split_content(tmp_path):
    dataset_dir = write_small(tmp_path, "oxford_pets", "clip_lora")
    split = dataset_dir / SPLIT_FILES["oxford_pets"]
    good = split.read_text()
    split.write_text(good[:-5])
    with pytest.raises(DatasetError, match="split file is not valid JSON"):
        build_dataset("oxford_pets", tmp_path, shots=1, seed=1)
    content = json.loads(good)
    content["train"][2] = ["x.jpg", "zero"]
    split.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="train entry 2 is not"):
        build_dataset("oxford_pets", tmp_path, shots=1, seed=1)
    content = json.loads(good)
    del content["test"]
    split.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="has no 'test' list"):
        build_dataset("oxford_pets", tmp_path, shots=1, seed=1)


def test_missing_image_is_named(tmp_path):
    dataset_dir = write_small(tmp_path, "dtd", "coop")
    test_entries = read_json(dataset_dir, "dtd")["test"]
    for entry in test_entries[3:5]:
        (dataset_dir / "images" / entry[0]).unlink()
    first = dataset_dir / "images" / test_entries[3][0]
    with pytest.raises(DatasetError, match=rf"image file not found: {first} \(2 of 15 test images"):
        build_dataset("dtd", tmp_path, shots=1, seed=1)


def test_corrupt_image_named_by_loader(tmp_path):
    write_small(tmp_path, "dtd", "coop")
    ds = build_dataset("dtd", tmp_path, shots=1, seed=1)
    bad = ds.train_x[2].impath
    Path(bad).write_bytes(b"not a jpeg at all")
    transform = build_test_transform(tiny_clip())
    for workers in (0, 1):
        loader = build_data_loader(ds.train_x, transform, batch_size=5, num_workers=workers)
        with pytest.raises(DatasetError, match=f"cannot decode image {bad}"):
            list(loader)


def test_train_transform_size_and_normalisation():
    model = tiny_clip(32)
    image = Image.fromarray(np.full((48, 40, 3), (200, 100, 50), np.uint8))
    out = build_train_transform(model)(image)
    assert out.shape == (3, 32, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    expected = (torch.tensor([200, 100, 50]).view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(out, expected.expand(3, 32, 32), atol=2e-2, rtol=0)
    open_clip.set_model_preprocess_cfg(model, {"size": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    out = build_train_transform(model)(image)
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out[:, 5, 7], (torch.tensor([200, 100, 50]) / 255 - 0.5) / 0.25, atol=2e-2, rtol=0)
    assert build_train_transform({"size": 224})(image).shape == (3, 224, 224)
    assert build_train_transform(model, size=48)(image).shape == (3, 48, 48)
    crop = build_train_transform(model).transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation.value == "bicubic"


def test_test_transform_is_open_clip_val_preprocessing():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ours = build_test_transform(tiny_clip(32))(image)
    theirs = open_clip.image_transform(32, is_train=False)(image)
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    prebuilt = open_clip.image_transform(64, is_train=False)
    assert build_test_transform(prebuilt) is prebuilt


def test_eval_loader_keeps_the_order(roots):
    ds = build_dataset("food101", roots[("food101", "clip_lora")], shots=2, seed=1)
    transform = build_test_transform(tiny_clip(32))
    loader = build_data_loader(ds.test, transform, batch_size=4, num_workers=0)
    assert loader.loader.pin_memory == torch.cuda.is_available()
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert torch.cat([labels for _, labels in loader]).tolist() == [d.label for d in ds.test]
    default = build_data_loader(ds.test, transform)
    assert default.loader.batch_size == 32


def test_default_workers_follow_the_device(roots, monkeypatch):
    """No loader workers without CUDA (they would take cores from the training step), else min(8, CPUs)."""
    ds = build_dataset("food101", roots[("food101", "clip_lora")], shots=2, seed=1)
    transform = build_test_transform(tiny_clip(32))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_data_loader(ds.test, transform).num_workers == 0
    assert TrainStream(ds.train_x, transform, batch_size=4, seed=1).num_workers == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpus = min(8, len(os.sched_getaffinity(0)))
    assert build_data_loader(ds.test, transform, pin_memory=False).num_workers == cpus
    assert TrainStream(ds.train_x, transform, batch_size=4, seed=1, pin_memory=False).num_workers == cpus
    assert build_data_loader(ds.test, transform, num_workers=1, pin_memory=False).num_workers == 1


def test_synthetic_deterministic_and_learnable(tmp_path):
    a = write_small(tmp_path / "a", "dtd", "coop", seed=3)
    b = write_small(tmp_path / "b", "dtd", "coop", seed=3)
    c = write_small(tmp_path / "c", "dtd", "coop", seed=4)
    first = read_json(a, "dtd")["train"][0][0]
    assert (a / "images" / first).read_bytes() == (b / "images" / first).read_bytes()
    assert (a / "images" / first).read_bytes() != (c / "images" / first).read_bytes()
    # nearest class centroid on per-channel mean colour separates the classes
    splits = read_json(a, "dtd")

    def feats(entries):
        return np.array([np.asarray(Image.open(a / "images" / e[0]), np.float32).mean((0, 1)) for e in entries])

    train_feats, train_labels = feats(splits["train"]), np.array([e[1] for e in splits["train"]])
    centroids = np.stack([train_feats[train_labels == k].mean(0) for k in range(5)])
    test_feats, test_labels = feats(splits["test"]), np.array([e[1] for e in splits["test"]])
    predicted = np.argmin(((test_feats[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test_labels).mean() >= 0.9


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "datasets.check", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_check_command(tmp_path):
    write_small(tmp_path, "dtd", "coop")
    write_small(tmp_path, "oxford_pets", "clip_lora")
    result = run_check("--root_path", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "classes: 5" in result.stdout and "train: 30 images" in result.stdout
    assert "val: 20 images" in result.stdout and "test: 15 images" in result.stdout
    assert "checked 2 dataset(s): all OK" in result.stdout
    missing = tmp_path / "OxfordPets" / "images" / "Blue_Checks_2.jpg"
    missing.unlink()
    result = run_check("--root_path", str(tmp_path), "--dataset", "oxford_pets")
    assert result.returncode == 1
    assert f"missing file (train): {missing}" in result.stdout and "PROBLEMS: 1" in result.stdout
    shutil.rmtree(tmp_path / "dtd")
    result = run_check("--root_path", str(tmp_path), "--dataset", "dtd")
    assert result.returncode == 1 and "dataset folder not found" in result.stdout
