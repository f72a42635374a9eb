"""Base-to-new class splits against CoOp's ``subsample_classes``, on synthetic trees of every dataset.

The reference re-implements KaiyangZhou/CoOp ``datasets/oxford_pets.py``
``subsample_classes`` from its facts: the labels of the first list (the
few-shot training subset) are collected and sorted, ``m = ceil(n / 2)``, base =
the first m labels, new = the rest; the chosen half is relabelled by its
position and every list keeps only its items, in order, with their class
names. It is applied to our all-class draw (``subsample="all"``), which
``test_datasets_benchmarks.py`` compares with CLIP-LoRA's draw, so a base run
trains on the base-class images of that draw.
"""

import json
import math

import pytest

from datasets import (BENCHMARK_DATASETS, ClassSplit, DatasetError, build_dataset, build_test_dataset,
                      write_synthetic_dataset)

# the real class counts of the eleven benchmarks (CoOp's split files) and CoOp's base/new sizes, by hand
REAL_SPLITS = {"imagenet": (1000, 500, 500), "caltech101": (100, 50, 50), "oxford_pets": (37, 19, 18),
               "stanford_cars": (196, 98, 98), "oxford_flowers": (102, 51, 51), "food101": (101, 51, 50),
               "fgvc_aircraft": (100, 50, 50), "sun397": (397, 199, 198), "dtd": (47, 24, 23),
               "eurosat": (10, 5, 5), "ucf101": (101, 51, 50)}


def coop_subsample_classes(*lists, subsample):
    """CoOp's ``subsample_classes`` on ``(impath, label, classname)`` tuples."""
    if subsample == "all":
        return lists
    labels = sorted({item[1] for item in lists[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [[(path, relabeler[label], name) for path, label, name in items if label in selected] for items in lists]


def triples(items):
    return [(d.impath, d.label, d.classname) for d in items]


@pytest.fixture(scope="module")
def real_count_root(tmp_path_factory):
    """The eleven benchmarks with their real class counts: 1 train, 1 val and 1 test image per class, 8 px
    (ImageNet: 2 images per class in train/, the shot and the validation image)."""
    root = tmp_path_factory.mktemp("real_counts")
    for name, (classes, _, _) in REAL_SPLITS.items():
        write_synthetic_dataset(root, name, "coop", num_classes=classes, train_per_class=1, val_per_class=1,
                                test_per_class=1, image_size=8)
    return root


@pytest.mark.parametrize("name", BENCHMARK_DATASETS)
def test_real_class_counts_split_as_coop(real_count_root, name):
    classes, base_count, new_count = REAL_SPLITS[name]
    everything = build_dataset(name, real_count_root, shots=1, seed=1)
    assert everything.num_classes == classes and everything.class_split is None
    drawn = [triples(everything.train_x), triples(everything.val), triples(everything.test)]
    for subsample, count in (("base", base_count), ("new", new_count)):
        half = build_dataset(name, real_count_root, shots=1, seed=1, subsample=subsample)
        assert half.num_classes == count and half.subsample == subsample
        expected = coop_subsample_classes(*drawn, subsample=subsample)
        assert [triples(half.train_x), triples(half.val), triples(half.test)] == expected
        offset = 0 if subsample == "base" else base_count
        assert half.classnames == everything.classnames[offset:offset + count]
        assert [half.classnames[label] for _, label, _ in expected[2]] == [name for *_, name in expected[2]]
        assert half.prompts() == [f"a photo of a {c}." for c in everything.classnames[offset:offset + count]]
        split = half.class_split
        assert split.base_labels == tuple(range(base_count)) and split.new_labels == tuple(range(base_count, classes))
        assert split.base_classes == everything.classnames[:base_count]
        assert split.new_classes == everything.classnames[base_count:]
        assert json.loads(json.dumps(split.as_record())) == {
            "base_labels": list(range(base_count)), "new_labels": list(range(base_count, classes)),
            "base_classes": everything.classnames[:base_count], "new_classes": everything.classnames[base_count:]}
        test_only = build_test_dataset(name, real_count_root, subsample=subsample)
        assert triples(test_only.test) == expected[2] and test_only.classnames == half.classnames
        assert (test_only.train_x, test_only.val, test_only.shots) == ([], [], 0)


@pytest.mark.parametrize("name", ["dtd", "imagenet", "fgvc_aircraft"])
def test_base_training_images_are_the_all_class_draw_restricted(tmp_path, name):
    """Every shot count and seed, short classes included (7 training images: 8 and 16 shots repeat images)."""
    write_synthetic_dataset(tmp_path, name, "clip_lora", num_classes=7, train_per_class=7, val_per_class=3,
                            test_per_class=2, image_size=8)
    for shots in (1, 4, 16) if name != "imagenet" else (1, 4):
        for seed in (1, 2, 3):
            drawn = build_dataset(name, tmp_path, shots=shots, seed=seed)
            lists = [triples(drawn.train_x), triples(drawn.val), triples(drawn.test)]
            for subsample, labels in (("base", range(4)), ("new", range(4, 7))):
                half = build_dataset(name, tmp_path, shots=shots, seed=seed, subsample=subsample)
                assert [triples(half.train_x), triples(half.val), triples(half.test)] == coop_subsample_classes(
                    *lists, subsample=subsample)
                assert len(half.train_x) == shots * len(labels)
                assert [item.label for item in half.train_x] == [i for i in range(len(labels)) for _ in range(shots)]


def test_imagefolder_splits_its_sorted_folders(tmp_path):
    folder = tmp_path / "own"
    write_synthetic_dataset(folder, "imagefolder", num_classes=5, train_per_class=4, val_per_class=0,
                            test_per_class=0, image_size=8)
    everything = build_dataset("imagefolder", folder, shots=1, seed=2)
    new = build_dataset("imagefolder", folder, shots=1, seed=2, subsample="new")
    assert everything.classnames == ["blue checks", "green dots", "purple rings", "red stripes", "yellow waves"]
    assert new.classnames == ["red stripes", "yellow waves"]
    assert triples(new.train_x) == coop_subsample_classes(triples(everything.train_x), subsample="new")[0]
    assert new.class_split == ClassSplit(tuple(everything.classnames), (0, 1, 2), (3, 4))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "one_class"
    write_synthetic_dataset(folder, "imagefolder", num_classes=1, train_per_class=6, val_per_class=0,
                            test_per_class=0, image_size=8)
    for subsample in ("base", "new"):
        with pytest.raises(DatasetError, match=r"^base-to-new needs at least 2 classes in each half, 4 in all \(a "
                                               r"half of one class scores 100% whatever the model does\); "
                                               r"imagefolder has 1$"):
            build_dataset("imagefolder", folder, shots=1, seed=1, subsample=subsample)
        with pytest.raises(DatasetError, match=r"^base-to-new needs at least 2 classes in each half, .* imagefolder "
                                               r"has 1$"):
            build_test_dataset("imagefolder", folder, subsample=subsample)
    with pytest.raises(DatasetError, match=f"^imagefolder at {folder} has 1 class: classification needs at least 2"):
        build_dataset("imagefolder", folder, shots=1, seed=1)  # "all" too: one class is always right
    assert sorted(p.name for p in folder.iterdir()) == ["red_stripes"]  # no split_imagefolder.json
    write_synthetic_dataset(tmp_path, "dtd", num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1,
                            image_size=8)
    with pytest.raises(DatasetError, match=r"^subsample must be one of all, base, new, got 'half'$"):
        build_dataset("dtd", tmp_path, shots=1, seed=1, subsample="half")
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    content = json.loads(split_path.read_text())
    content["train"] = [entry for entry in content["train"] if entry[1] != 1]  # class 1 keeps val and test only
    split_path.write_text(json.dumps(content))
    assert build_dataset("dtd", tmp_path, shots=1, seed=1).num_classes == 3
    with pytest.raises(DatasetError, match=r"^class 'blue checks' \(label 1\) of dtd has no training image \(1 of 3 "
                                           r"classes have none\); base-to-new splits the classes of the training"):
        build_dataset("dtd", tmp_path, shots=1, seed=1, subsample="base")
