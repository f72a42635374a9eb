"""The eleven CoOp benchmarks on synthetic trees in both folder conventions, against CLIP-LoRA's sampling.

The expected folders, split files and templates below are written out from
CoOp's DATASETS.md and zero-shot templates and from CLIP-LoRA's readers, not
read from the registry. The references re-implement CLIP-LoRA's reading and
drawing on the raw files: ``random.seed(seed)``, then ``random.sample`` (or
``random.choices`` for a short class) per label in order of first appearance,
validation before training; for ImageNet ``torchvision.datasets.ImageFolder``
listings and one ``random.sample(K + min(K, 4))`` per class.
"""

import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from conftest import clip_lora_draw
from datasets import BENCHMARK_DATASETS, DatasetError, build_dataset, get_spec, list_datasets, write_synthetic_dataset
from datasets.folders import IMAGE_EXTENSIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
# dataset → (CoOp image root, CLIP-LoRA image root, split file in the dataset folder, CoOp template, table title)
EXPECTED = {
    "imagenet": ("imagenet/images", "imagenet", "classnames.txt", "a photo of a {}.", "ImageNet"),
    "caltech101": ("caltech-101/101_ObjectCategories", "Caltech101/101_ObjectCategories", "split_zhou_Caltech101.json",
                   "a photo of a {}.", "Caltech"),
    "oxford_pets": ("oxford_pets/images", "OxfordPets/images", "split_zhou_OxfordPets.json",
                    "a photo of a {}, a type of pet.", "Pets"),
    "stanford_cars": ("stanford_cars", "StanfordCars", "split_zhou_StanfordCars.json", "a photo of a {}.", "Cars"),
    "oxford_flowers": ("oxford_flowers/jpg", "Flower102/jpg", "split_zhou_OxfordFlowers.json",
                       "a photo of a {}, a type of flower.", "Flowers"),
    "food101": ("food-101/images", "Food101/images", "split_zhou_Food101.json", "a photo of {}, a type of food.",
                "Food"),
    "fgvc_aircraft": ("fgvc_aircraft/images", "fgvc_aircraft/images", "variants.txt",
                      "a photo of a {}, a type of aircraft.", "Aircraft"),
    "sun397": ("sun397/SUN397", "SUN397/SUN397", "split_zhou_SUN397.json", "a photo of a {}.", "SUN"),
    "dtd": ("dtd/images", "DTD/images", "split_zhou_DescribableTextures.json", "{} texture.", "DTD"),
    "eurosat": ("eurosat/2750", "eurosat/2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
                "EuroSAT"),
    "ucf101": ("ucf101/UCF-101-midframes", "UCF101/UCF-101-midframes", "split_zhou_UCF101.json",
               "a photo of a person doing {}.", "UCF"),
}
CONVENTIONS = ("coop", "clip_lora")
LAYOUTS = [(name, convention) for name in EXPECTED for convention in CONVENTIONS
           if convention == "coop" or EXPECTED[name][0] != EXPECTED[name][1]]
TREE = dict(num_classes=5, train_per_class=10, val_per_class=4, test_per_class=3, image_size=8)
IMAGENET_TREE = dict(TREE, train_per_class=16)  # 20 train/ images per class: 16 shots + 4 validation images
SHOTS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One root per convention holding all eleven datasets (about 1,900 8-pixel images).

    Classes have 10 training images, so 16 shots take the with-replacement branch of the sampler.
    """
    out = {}
    for convention in CONVENTIONS:
        out[convention] = tmp_path_factory.mktemp(convention)
        for name in EXPECTED:
            sizes = IMAGENET_TREE if name == "imagenet" else TREE
            write_synthetic_dataset(out[convention], name, convention, **sizes)
    return out


def image_root(root, name, convention):
    return Path(root) / EXPECTED[name][CONVENTIONS.index(convention)]


def dataset_folder(root, name, convention):
    return Path(root) / EXPECTED[name][CONVENTIONS.index(convention)].split("/")[0]


def reference_listed(root, name, convention):
    """(train, val, test) as CLIP-LoRA reads the split file or, for FGVC-Aircraft, the variant lists."""
    images, folder = image_root(root, name, convention), dataset_folder(root, name, convention)
    if name == "fgvc_aircraft":
        classes = [line.strip() for line in open(folder / "variants.txt")]
        label = {c: i for i, c in enumerate(classes)}
        splits = []
        for split in ("train", "val", "test"):
            rows = [line.strip().split(" ") for line in open(folder / f"images_variant_{split}.txt")]
            splits.append([(os.path.join(images, r[0] + ".jpg"), label[" ".join(r[1:])], " ".join(r[1:]))
                           for r in rows])
        return splits
    content = json.loads((folder / EXPECTED[name][2]).read_text())
    return [[(os.path.join(images, p), int(y), c) for p, y, c in content[split]] for split in ("train", "val", "test")]


def reference_imagenet(root, convention, shots):
    """CLIP-LoRA's ImageNet reader: ImageFolder listings, one sample of K + min(K, 4) per class."""
    images = image_root(root, "imagenet", convention)
    train_folder, test_folder = ImageFolder(str(images / "train")), ImageFolder(str(images / "val"))
    by_label = defaultdict(list)
    for path, target in train_folder.imgs:
        by_label[target].append((path, target))
    train, val = [], []
    for group in by_label.values():
        picked = random.sample(group, shots + min(4, shots))
        train += picked[:shots]
        val += picked[shots:]
    wnid_name = dict(line.strip().split(" ", 1) for line in open(dataset_folder(root, "imagenet", convention)
                                                                   / "classnames.txt"))
    classnames = [wnid_name[wnid] for wnid in train_folder.classes]
    return train, val, [tuple(item) for item in test_folder.imgs], classnames


def reference(root, name, convention, shots, seed):
    """(train, val, test) as (path, label) pairs and the class names, under random.seed(seed)."""
    state = random.getstate()
    random.seed(seed)
    try:
        if name == "imagenet":
            return reference_imagenet(root, convention, shots)
        train, val, test = reference_listed(root, name, convention)
        val_drawn = clip_lora_draw(val, min(shots, 4))
        train_drawn = clip_lora_draw(train, shots)
        names = {label: c.replace("_", " ") for _, label, c in train}
        pairs = [[(p, y) for p, y, _ in items] for items in (train_drawn, val_drawn, test)]
        return (*pairs, [names[label] for label in sorted(names)])
    finally:
        random.setstate(state)


def pairs(items):
    return [(d.impath, d.label) for d in items]


def test_registry_lists_every_dataset_with_title_and_template():
    assert list_datasets() == sorted([*EXPECTED, "imagefolder", "scenes_compose", "scenes_names", "imagenetv2",
                                      "imagenet_sketch", "imagenet_a", "imagenet_r"])
    assert BENCHMARK_DATASETS == tuple(EXPECTED)  # CoOp's table order
    for name, (_, _, split_file, template, title) in EXPECTED.items():
        spec = get_spec(name)
        assert (spec.display_name, spec.template, spec.split_file) == (title, template, split_file)
    assert get_spec("imagefolder").template == "a photo of a {}."


def test_image_extensions_are_torchvisions():
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


@pytest.mark.parametrize("name,convention", LAYOUTS)
def test_both_conventions_load_like_clip_lora(roots, name, convention):
    root = roots[convention]
    ds = build_dataset(name, root, shots=4, seed=1)
    assert ds.dataset_dir == dataset_folder(root, name, convention)
    train, val, test, classnames = reference(root, name, convention, shots=4, seed=1)
    assert ds.classnames == classnames and ds.num_classes == 5
    assert (pairs(ds.train_x), pairs(ds.val), pairs(ds.test)) == (train, val, test)
    assert len(ds.test) == 15 and all(Path(d.impath).is_file() for d in ds.train_x + ds.val + ds.test)
    assert ds.prompts() == [f"a photo of a {c}." for c in classnames]
    assert ds.prompts("dataset") == [EXPECTED[name][3].format(c) for c in classnames]


@pytest.mark.parametrize("name", EXPECTED)
def test_counts_per_class_and_seed_determinism(roots, name):
    for shots in SHOTS:
        ds = build_dataset(name, roots["coop"], shots=shots, seed=2)
        assert Counter(d.label for d in ds.train_x) == {label: shots for label in range(5)}
        assert Counter(d.label for d in ds.val) == {label: min(shots, 4) for label in range(5)}
    drawn = {seed: pairs(build_dataset(name, roots["coop"], shots=2, seed=seed).train_x) for seed in (1, 2, 3)}
    assert drawn[1] == pairs(build_dataset(name, roots["coop"], shots=2, seed=1).train_x)
    assert len({tuple(d) for d in drawn.values()}) == 3


@pytest.mark.parametrize("name", EXPECTED)
def test_subsets_equal_clip_lora_for_every_shot_and_seed(roots, name):
    for convention in CONVENTIONS:
        for shots in SHOTS:
            for seed in (1, 2, 3):
                ds = build_dataset(name, roots[convention], shots=shots, seed=seed)
                train, val, _, _ = reference(roots[convention], name, convention, shots, seed)
                assert (pairs(ds.train_x), pairs(ds.val)) == (train, val), (convention, shots, seed)
    if name == "imagenet":  # ImageNet's validation images are drawn from train/, disjoint from the shots
        ds = build_dataset(name, roots["coop"], shots=16, seed=1)
        assert not {d.impath for d in ds.train_x} & {d.impath for d in ds.val}
        assert all("/train/" in d.impath for d in ds.train_x + ds.val) and all("/val/" in d.impath for d in ds.test)


def test_imagenet_labels_follow_sorted_folders_not_classnames_order(roots):
    folder = dataset_folder(roots["clip_lora"], "imagenet", "clip_lora")
    lines = (folder / "classnames.txt").read_text().splitlines()
    assert lines[0].startswith("n00000005 ")  # the synthetic file lists classes in reverse
    ds = build_dataset("imagenet", roots["clip_lora"], shots=1, seed=1)
    assert ds.classnames[0] == lines[-1].split(" ", 1)[1] and ds.test[0].impath.endswith(".JPEG")
    assert [Path(d.impath).parent.name for d in ds.train_x] == [f"n{i:08d}" for i in range(1, 6)]


def small_tree(tmp_path, name, convention="coop"):
    write_synthetic_dataset(tmp_path, name, convention, num_classes=2, train_per_class=3, val_per_class=1,
                            test_per_class=1, image_size=8)
    return dataset_folder(tmp_path, name, convention)


@pytest.mark.parametrize("name,missing", [(n, EXPECTED[n][2]) for n in EXPECTED] +
                         [("fgvc_aircraft", "images_variant_val.txt")])
def test_missing_split_file_is_named(tmp_path, name, missing):
    path = small_tree(tmp_path, name) / missing
    path.unlink()
    with pytest.raises(DatasetError, match=r"^(split|class-name) file not found: " + str(path)) as error:
        build_dataset(name, tmp_path, shots=1, seed=1)
    assert "\n" not in str(error.value)


def test_unknown_class_in_variant_list(tmp_path):
    folder = small_tree(tmp_path, "fgvc_aircraft", "clip_lora")
    lines = (folder / "images_variant_test.txt").read_text().splitlines()
    lines[1] = lines[1].split(" ")[0] + " Boeing 999"
    (folder / "images_variant_test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"^unknown class 'Boeing 999' in {folder}/images_variant_test.txt line 2 "
                                           rf"\(not listed in {folder}/variants.txt\)$"):
        build_dataset("fgvc_aircraft", tmp_path, shots=1, seed=1)


def test_variant_list_problems_name_the_split_list(tmp_path):
    """FGVC-Aircraft's images are listed in images_variant_<split>.txt, not in variants.txt (the class list)."""
    folder = small_tree(tmp_path, "fgvc_aircraft")  # class 0: train 1000000-1000002, val 1000003, test 1000004
    (folder / "images" / "1000003.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"^image file not found: {folder}/images/1000003.jpg \(1 of 2 sampled "
                                           rf"val images listed in {folder}/images_variant_val.txt are missing"):
        build_dataset("fgvc_aircraft", tmp_path, shots=3, seed=1)
    (folder / "images" / "1000001.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"^image file not found: {folder}/images/1000001.jpg \(1 of 6 sampled "
                                           rf"train images listed in {folder}/images_variant_train.txt are missing"):
        build_dataset("fgvc_aircraft", tmp_path, shots=3, seed=1)
    (folder / "images_variant_test.txt").write_text("")
    with pytest.raises(DatasetError, match=rf"^split file {folder}/images_variant_test.txt has an empty 'test' list$"):
        build_dataset("fgvc_aircraft", tmp_path, shots=3, seed=1)
    result = run_check("--root_path", str(tmp_path), "--dataset", "fgvc_aircraft")
    assert result.returncode == 1 and "PROBLEMS: 3 " in result.stdout
    assert f"test split is empty in {folder}/images_variant_test.txt\n" in result.stdout
    assert f"missing file (train): {folder}/images/1000001.jpg\n" in result.stdout
    assert f"missing file (val): {folder}/images/1000003.jpg\n" in result.stdout


def test_imagenet_bad_folders(tmp_path):
    folder = small_tree(tmp_path, "imagenet")
    images = folder / "images"
    for image in (images / "val" / "n00000002").iterdir():
        image.rename(images / "val" / "n00000002" / (image.name + ".txt"))
    with pytest.raises(DatasetError, match=rf"^class folder has no images: {images}/val/n00000002 \(expected .jpg"):
        build_dataset("imagenet", tmp_path, shots=1, seed=1)
    with pytest.raises(DatasetError, match=rf"^class folder {images}/train/n00000001 has 4 images; 3 shots \+ 3 "
                                           r"validation images need 6"):
        build_dataset("imagenet", tmp_path, shots=3, seed=1)
    (images / "val" / "n00000002").rename(images / "val" / "n00000009")
    with pytest.raises(DatasetError, match=rf"^class folders of {images}/val differ from those of {images}/train"):
        build_dataset("imagenet", tmp_path, shots=1, seed=1)
    (images / "val" / "n00000009").rename(images / "val" / "n00000002")
    (folder / "classnames.txt").write_text("n00000002 blue checks\n")
    with pytest.raises(DatasetError, match=rf"^class folder 'n00000001' has no line in {folder}/classnames.txt"):
        build_dataset("imagenet", tmp_path, shots=1, seed=1)
    (images / "train").rename(images / "training")
    with pytest.raises(DatasetError, match=rf"^image folder not found: {images}/train \(expected {folder}/ holding "
                                           rf"images/train/ and classnames.txt or {folder}/ holding train/"):
        build_dataset("imagenet", tmp_path, shots=1, seed=1)


def test_prompt_templates(roots):
    ds = build_dataset("dtd", roots["clip_lora"], shots=1, seed=1)
    assert ds.prompts("dataset")[0] == f"{ds.classnames[0]} texture."
    assert ds.prompts(None) == ds.prompts("default") == [f"a photo of a {c}." for c in ds.classnames]
    assert ds.prompts("itap of a {}.")[1] == f"itap of a {ds.classnames[1]}."
    with pytest.raises(DatasetError, match=r"prompt template must contain exactly one '\{\}'.*default, dataset; got 'datset'"):
        ds.prompts("datset")


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "datasets.check", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_check_command_on_eleven_dataset_roots(roots, tmp_path):
    for convention in CONVENTIONS:
        result = run_check("--root_path", str(roots[convention]))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("  OK\n") == 11 and "checked 11 dataset(s): all OK" in result.stdout
        assert "train: 50 images, 5 classes, fewest per class: 10" in result.stdout
        assert "train (train/): 100 images, 5 classes, fewest per class: 20" in result.stdout
        ucf = dataset_folder(roots[convention], "ucf101", convention)
        assert f"ucf101: {ucf} ({convention} layout)" in result.stdout
    assert "eurosat: " + str(roots["clip_lora"] / "eurosat") + " (coop and clip_lora layout)" in result.stdout
    folder = small_tree(tmp_path, "fgvc_aircraft")
    (folder / "images" / "1000001.jpg").unlink()
    small_tree(tmp_path, "imagenet")
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    result = run_check("--root_path", str(tmp_path))
    assert result.returncode == 1 and "checked 2 dataset(s): problems in imagenet, fgvc_aircraft" in result.stdout
    assert f"missing file (train): {folder}/images/1000001.jpg" in result.stdout
    assert f"imagenet: class-name file not found: {tmp_path}/imagenet/classnames.txt" in result.stdout
