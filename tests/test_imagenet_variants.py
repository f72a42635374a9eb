"""The four test-only ImageNet variants against CoOp's readers, on synthetic trees in CoOp's layout.

The references re-implement KaiyangZhou/CoOp ``datasets/imagenetv2.py``,
``imagenet_sketch.py``, ``imagenet_a.py`` and ``imagenet_r.py`` from their
facts: ``ImageNet.read_classnames`` keeps ``classnames.txt``'s lines in order
(``<folder> <name words>``); V2 reads folder ``str(label)`` for each label and
names it by the label-th line (CoOp loops over ``range(1000)``, the line count
of its file); Sketch, A and R enumerate the sorted non-hidden entries of their
image folder (A and R dropping ``README.txt``); images are a folder's
non-hidden entries in ``os.listdir`` order, which CoOp leaves unsorted.
"""

import os
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest

from datasets import (DOMAIN_DATASETS, DatasetError, build_dataset, build_test_dataset, get_spec,
                      write_synthetic_dataset)
from datasets.check import main as check_main
from datasets.synthetic import main as synthetic_main

# name → (dataset folder, image folder, CoOp's ignored entries), from CoOp's readers and DATASETS.md
COOP = {"imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", None),
        "imagenet_sketch": ("imagenet-sketch", "images", []),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", ["README.txt"]),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", ["README.txt"])}
TITLES = {"imagenetv2": "ImageNet-V2", "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A",
          "imagenet_r": "ImageNet-R"}


def listdir_nohidden(path, sort=False):
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    return sorted(items) if sort else items


def coop_read_classnames(text_file):
    classnames = OrderedDict()
    for line in open(text_file):
        words = line.strip().split(" ")
        classnames[words[0]] = " ".join(words[1:])
    return classnames


def coop_reader(root, name):
    """CoOp's items ``[(impath, label, classname)]`` with each class's files sorted, and its class names."""
    folder, image_folder, ignored = COOP[name]
    image_dir = os.path.join(root, folder, image_folder)
    classnames = coop_read_classnames(os.path.join(root, folder, "classnames.txt"))
    if ignored is None:  # V2
        keys = list(classnames.keys())
        folders = [(str(label), classnames[keys[label]]) for label in range(len(classnames))]
    else:
        folders = [(f, classnames[f]) for f in listdir_nohidden(image_dir, sort=True) if f not in ignored]
    items = []
    for label, (class_folder, classname) in enumerate(folders):
        names = listdir_nohidden(os.path.join(image_dir, class_folder))
        items += [(os.path.join(image_dir, class_folder, n), label, classname) for n in sorted(names)]
    return items, [classname for _, classname in folders]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The four variants of an 8-class synthetic ImageNet, 3 test images per class."""
    root = tmp_path_factory.mktemp("variants")
    for name in DOMAIN_DATASETS:
        write_synthetic_dataset(root, name, num_classes=8, test_per_class=3, image_size=8)
    return root


@pytest.mark.parametrize("name", DOMAIN_DATASETS)
def test_same_images_labels_and_names_as_coop(root, name):
    dataset = build_test_dataset(name, root)
    items, classnames = coop_reader(root, name)
    assert [(d.impath, d.label, d.classname) for d in dataset.test] == items
    assert dataset.classnames == classnames and dataset.num_classes == (4 if name in ("imagenet_a", "imagenet_r")
                                                                        else 8)
    assert (dataset.train_x, dataset.val, dataset.shots) == ([], [], 0)
    assert dataset.dataset_dir == root / COOP[name][0]
    spec = get_spec(name)
    assert spec.test_only and spec.display_name == TITLES[name]
    assert dataset.templates == get_spec("imagenet").templates == {"default": "a photo of a {}.",
                                                                     "dataset": "a photo of a {}."}
    assert dataset.prompts() == [f"a photo of a {c}." for c in classnames]


def test_a_and_r_are_200_way_over_their_own_classes(tmp_path):
    """400 ImageNet classes; A and R keep every other one: 200 classes, labels 0..199, 200 prompts."""
    for name in ("imagenet_a", "imagenet_r"):
        write_synthetic_dataset(tmp_path, name, num_classes=400, test_per_class=1, image_size=4)
        dataset = build_test_dataset(name, tmp_path)
        wnids = sorted(p.name for p in (tmp_path / COOP[name][0] / COOP[name][1]).iterdir() if p.is_dir())
        assert len(wnids) == 200 and wnids[:2] == ["n00000002", "n00000004"]
        lines = dict(line.split(" ", 1) for line in (tmp_path / COOP[name][0] / "classnames.txt").read_text()
                     .splitlines())
        assert len(lines) == 400
        assert dataset.classnames == [lines[w] for w in wnids] and len(dataset.prompts()) == 200
        assert [d.label for d in dataset.test] == list(range(200))
        assert [Path(d.impath).parent.name for d in dataset.test] == wnids


def test_v2_labels_follow_imagenet_order_whatever_the_line_order(root, tmp_path):
    """V2's folder i is ImageNet class i (sorted wnids): a shuffled classnames.txt names the folders the same
    (CoOp's reader, which takes the line order, agrees only on a file in wnid order, as CoOp's own is)."""
    shutil.copytree(root / "imagenetv2", tmp_path / "imagenetv2")
    lines = (tmp_path / "imagenetv2" / "classnames.txt").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (tmp_path / "imagenetv2" / "classnames.txt").write_text("\n".join(lines) + "\n")
    shuffled, ordered = build_test_dataset("imagenetv2", tmp_path), build_test_dataset("imagenetv2", root)
    assert shuffled.classnames == ordered.classnames == ["red stripes", "blue checks", "green dots",
                                                         "yellow waves", "purple rings", "orange zigzag",
                                                         "red diagonal", "blue grid"]
    assert [(d.label, d.classname) for d in shuffled.test] == [(d.label, d.classname) for d in ordered.test]


def test_training_on_a_variant_is_refused(root):
    for shots in (1, 16, 0):
        with pytest.raises(DatasetError, match=r"^imagenet_a is a test-only dataset \(it has no training images\): "
                                               r"evaluate on it with build_test_dataset\('imagenet_a', root\) "
                                               rf"\(--eval_on imagenet_a\), not with shots={shots}$"):
            build_dataset("imagenet_a", root, shots=shots)


def test_bad_trees_are_one_line_errors(root, tmp_path):
    for name in DOMAIN_DATASETS:
        shutil.copytree(root / COOP[name][0], tmp_path / COOP[name][0])
    sketch, adversarial, v2 = (tmp_path / COOP[n][0] for n in ("imagenet_sketch", "imagenet_a", "imagenetv2"))
    (sketch / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match=rf"^class-name file not found: {sketch}/classnames.txt \(expected "
                                           rf"{sketch}/ holding images/ and classnames.txt; see DATASET.md\)$"):
        build_test_dataset("imagenet_sketch", tmp_path)
    shutil.rmtree(tmp_path / "imagenet-rendition" / "imagenet-r")
    with pytest.raises(DatasetError, match=r"^image folder not found: .*imagenet-rendition/imagenet-r \(expected"):
        build_test_dataset("imagenet_r", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=rf"^dataset folder not found: {tmp_path}/empty/imagenet-adversarial "
                                           r"\(expected .*/imagenet-adversarial/ holding imagenet-a/ and classnames"):
        build_test_dataset("imagenet_a", tmp_path / "empty")
    lines = (adversarial / "classnames.txt").read_text().splitlines()
    (adversarial / "classnames.txt").write_text("\n".join(line for line in lines if "n00000004" not in line))
    with pytest.raises(DatasetError, match=rf"^class folder 'n00000004' has no line in {adversarial}/classnames.txt "
                                           r"\(1 of 4 class folders are not listed\)$"):
        build_test_dataset("imagenet_a", tmp_path)
    image_dir = v2 / COOP["imagenetv2"][1]
    (image_dir / "5").rename(image_dir / "15")
    with pytest.raises(DatasetError, match=rf"^class folder not found: {image_dir}/5 \(1 of 8 missing; ImageNet-V2 "
                                           rf"needs one folder per line of {v2}/classnames.txt, 0..7\)$"):
        build_test_dataset("imagenetv2", tmp_path)
    (image_dir / "15").rename(image_dir / "5")
    (image_dir / "8").mkdir()
    with pytest.raises(DatasetError, match=rf"^unexpected class folder {image_dir}/8: ImageNet-V2's folders are the "
                                           r"class numbers 0..7 of the 8 classes in .*classnames.txt$"):
        build_test_dataset("imagenetv2", tmp_path)


def test_synthetic_command_and_check(tmp_path, capsys):
    for name in DOMAIN_DATASETS:
        synthetic_main(["--root", str(tmp_path), "--dataset", name, "--num_classes", "6", "--test_per_class", "2",
                        "--image_size", "8"])
    assert capsys.readouterr().out.count("wrote synthetic imagenet") == 4
    assert (tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt").is_file()
    assert check_main(["--root_path", str(tmp_path), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "checked 4 dataset(s): all OK" in out and out.count("  OK\n") == 4
    assert out.count("classes: 6 (names from classnames.txt); test only") == 2
    assert out.count("classes: 3 (names from classnames.txt); test only") == 2
    assert out.count("test: 12 images, 6 classes, fewest per class: 2") == 2
    (tmp_path / "imagenetv2" / "classnames.txt").unlink()
    assert check_main(["--root_path", str(tmp_path)]) == 1
    assert "checked 4 dataset(s): problems in imagenetv2" in capsys.readouterr().out


def test_variant_images_are_their_own(root, tmp_path):
    """Deterministic in the seed, and not copies of a synthetic ImageNet's images nor of each other."""
    write_synthetic_dataset(tmp_path, "imagenet", num_classes=8, train_per_class=3, val_per_class=0,
                            test_per_class=3, image_size=8)
    imagenet = {p.read_bytes() for p in (tmp_path / "imagenet").rglob("*.JPEG")}
    seen = set()
    for name in DOMAIN_DATASETS:
        again = write_synthetic_dataset(tmp_path / "again", name, num_classes=8, test_per_class=3, image_size=8)
        images = [Path(d.impath).read_bytes() for d in build_test_dataset(name, root).test]
        assert images == [Path(d.impath).read_bytes() for d in build_test_dataset(name, again.parent).test]
        assert not imagenet & set(images) and not seen & set(images)
        seen |= set(images)
