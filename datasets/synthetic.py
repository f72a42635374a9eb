"""Write a small procedural-texture dataset in the exact on-disk layout of any registered dataset.

Each class is a (colour, pattern) texture (``textures.py``). Files, folder
names and split files follow the chosen dataset and folder convention (``coop``
or ``clip_lora``, see ``registry.py``): CoOp split JSON files, FGVC-Aircraft's
``variants.txt`` and ``images_variant_*.txt``, ImageNet's ``train/``/``val/``
wnid folders with ``classnames.txt`` (written in reverse label order, as the
labels come from the sorted folders), or, for ``imagefolder``, bare class
folders under ``root`` (its split is written by the reader). File and class
names imitate the real ones (flat ``Abyssinian_12.jpg``-style Pets files,
``cars_train/00012.jpg``, ``.JPEG`` for ImageNet, "2012 ..." car names ...), so
the tests use the same readers as real data. For ImageNet the
train and val images of a class go to ``train/`` (CLIP-LoRA draws both from
there) and the test images to ``val/``. The four test-only ImageNet variants
(``imagenetv2``, ``imagenet_sketch``, ``imagenet_a``, ``imagenet_r``) get
``test_per_class`` images per class in CoOp's folders, a ``classnames.txt``
listing the ImageNet classes of a synthetic ``imagenet`` of the same size (in
wnid order, as CoOp's file), V2's numbered folders, and for A and R a subset
(every other class) and the ``README.txt`` their archives hold; their images
are shifted (Sketch grey, A noisy, R posterised). Output is deterministic in ``seed``.

Sizes are checked before anything is written (``check_sizes``): 1 to the real
dataset's class count (ImageNet's for its variants, 1,000 for ``imagefolder``),
at least one train and one test image per class and none negative (the
readers refuse an empty train or test list), four in all per class for
``imagefolder`` (its reader splits each class 50/20/30), 1 to 65,500 pixels a
side (JPEG's limit), a non-negative seed.

    python -m datasets.synthetic --root /tmp/data --dataset dtd --convention coop
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Union

import numpy as np
from PIL import Image

from lora_zoo.files import atomic_write

from .base import DatasetError
from .imagefolder import MIN_IMAGES_PER_CLASS
from .registry import BENCHMARK_SIZES, CONVENTIONS, DOMAIN_DATASETS, DatasetSpec, get_spec, list_datasets
from .splits import VARIANT_CLASS_FILE, variant_list_file
from .textures import class_list, render_texture

MAX_CLASSES = 1000  # a dataset without a real class count (imagefolder): ImageNet's
MAX_IMAGE_SIZE = 65500  # libjpeg's largest side


def stored_classname(dataset: str, colour: str, pattern: str) -> str:
    """The class name as the dataset's split file (or folder) spells it."""
    spaced, titled = f"{colour} {pattern}", f"{colour.title()} {pattern.title()}"
    return {"stanford_cars": f"2012 {titled}", "oxford_flowers": spaced, "sun397": spaced, "imagenet": spaced,
            "fgvc_aircraft": f"{titled.replace(' ', '-')} 100", "eurosat": titled, "ucf101": titled.replace(" ", "_"),
            }.get(dataset, f"{colour}_{pattern}")


def wnid(label: int) -> str:
    return f"n{label + 1:08d}"


def relative_path(dataset: str, colour: str, pattern: str, label: int, index: int, serial: int, split: str) -> str:
    """Path of one image relative to the dataset's image root; ``serial`` counts images over all classes."""
    key, camel = f"{colour}_{pattern}", f"{colour.title()}{pattern.title()}"
    if dataset == "imagenet":
        if split == "test":
            return f"val/{wnid(label)}/ILSVRC2012_val_{serial + 1:08d}.JPEG"
        return f"train/{wnid(label)}/{wnid(label)}_{index + 1}.JPEG"
    flat = {"oxford_pets": f"{key.title()}_{index + 1}.jpg", "oxford_flowers": f"image_{serial + 1:05d}.jpg",
            "fgvc_aircraft": f"{1000000 + serial:07d}.jpg",
            "stanford_cars": f"cars_{'test' if split == 'test' else 'train'}/{serial + 1:05d}.jpg"}
    if dataset in flat:
        return flat[dataset]
    nested = {"food101": f"{key}/{100000 + index}.jpg", "caltech101": f"{key}/image_{index + 1:04d}.jpg",
              "sun397": f"{colour[0]}/{key}/sun_{serial + 1:06d}.jpg", "eurosat": f"{camel}/{camel}_{index + 1}.jpg",
              "ucf101": f"{colour.title()}_{pattern.title()}/v_{camel}_g{index // 4 + 1:02d}_c{index % 4 + 1:02d}.jpg"}
    return nested.get(dataset, f"{key}/{key}_{index + 1:04d}.jpg")  # dtd, imagefolder


def _write_lines(path: Path, lines: List[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_json_split(path: Path, entries: Dict[str, list]) -> None:
    """A CoOp split file (compact JSON, as the generators have always written it), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(entries), encoding="utf-8"))


def write_class_images(image_dir: Path, classnames: Sequence[str], counts: Dict[str, int],
                       seed: Union[int, Sequence[int]],
                       image_path: Callable[[int, int, int, str], str],
                       render: Callable[[int, np.random.Generator], np.ndarray], **save_options) -> Dict[str, list]:
    """Render ``counts[split]`` images of each class under ``image_dir``; return the CoOp split entries
    ``{split: [[relative path, label, class name], ...]}`` (shared by this generator and ``scenes.py``).

    The ``index``-th image of class ``label`` (counted over its splits in ``counts`` order; ``split_index``
    is the split's place there) is ``render(label, rng)`` with ``rng = default_rng([seed, label, split_index,
    index])`` (``[*seed, label, ...]`` when ``seed`` is a sequence), saved at ``image_path(label, index, serial,
    split)`` (``serial`` counts images over all classes) with Pillow's ``save_options``. Each image depends on
    its own key only.
    """
    entries: Dict[str, list] = {split: [] for split in counts}
    seed_key = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    serial = 0
    for label, classname in enumerate(classnames):
        index = 0
        for split_index, (split, count) in enumerate(counts.items()):
            for _ in range(count):
                rng = np.random.default_rng([*seed_key, label, split_index, index])
                relpath = image_path(label, index, serial, split)
                (image_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render(label, rng)).save(image_dir / relpath, **save_options)
                entries[split].append([relpath, label, classname])
                index += 1
                serial += 1
    return entries


def _write_split_files(spec: DatasetSpec, dataset_dir: Path, entries: Dict[str, list], classnames: List[str]) -> None:
    if spec.split_format == "json":
        write_json_split(dataset_dir / spec.split_file, entries)
    elif spec.split_format == "variant_lists":
        _write_lines(dataset_dir / VARIANT_CLASS_FILE, classnames)
        for split, items in entries.items():
            _write_lines(dataset_dir / variant_list_file(split),
                         [f"{Path(path).stem} {name}" for path, _, name in items])
    elif spec.split_format == "class_folders":
        _write_lines(dataset_dir / spec.split_file,
                     [f"{wnid(label)} {name}" for label, name in reversed(list(enumerate(classnames)))])


#: per variant: image path in a class folder (``{folder}``, ``{index}``, ``{serial}``, ``{name}``) and image shift
VARIANT_FILES = {"imagenetv2": "{folder}/{serial:040x}.jpeg", "imagenet_sketch": "{folder}/sketch_{index}.JPEG",
                 "imagenet_a": "{folder}/0.{serial:06d}_{name} _ {name}_0.5.jpg",
                 "imagenet_r": "{folder}/art_{index}.jpg"}
VARIANT_SHIFTS: Dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "imagenetv2": lambda image, rng: image,
    "imagenet_sketch": lambda image, rng: np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8),
    "imagenet_a": lambda image, rng: np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8),
    "imagenet_r": lambda image, rng: (image // 128 * 255).astype(np.uint8),
}


def variant_labels(dataset: str, num_classes: int) -> List[int]:
    """The ImageNet labels a variant keeps: all for V2 and Sketch, every other one (from the second) for A and R
    (200 of 1,000 in the real sets)."""
    if dataset in ("imagenet_a", "imagenet_r") and num_classes > 1:
        return list(range(1, num_classes, 2))
    return list(range(num_classes))


def write_variant(dataset: str, dataset_dir: Path, image_dir: Path, num_classes: int, test_per_class: int,
                  image_size: int, seed: int) -> None:
    """An ImageNet variant: its class folders of shifted images and ImageNet's ``classnames.txt``."""
    classes = class_list(num_classes)
    names = [stored_classname("imagenet", colour, pattern) for colour, pattern in classes]
    kept = variant_labels(dataset, num_classes)
    numbered = get_spec(dataset).split_format == "numbered_folders"
    shift = VARIANT_SHIFTS[dataset]

    def image_path(label, index, serial, split):
        folder = str(kept[label]) if numbered else wnid(kept[label])
        return VARIANT_FILES[dataset].format(folder=folder, index=index, serial=serial, name=names[kept[label]])

    write_class_images(image_dir, [names[label] for label in kept], {"test": test_per_class},
                       (seed, DOMAIN_DATASETS.index(dataset) + 1), image_path=image_path,
                       render=lambda label, rng: shift(render_texture(*classes[kept[label]], image_size, rng), rng),
                       format="JPEG", quality=92)
    _write_lines(dataset_dir / get_spec(dataset).split_file,
                 [f"{wnid(label)} {name}" for label, name in enumerate(names)])
    if dataset in ("imagenet_a", "imagenet_r"):
        _write_lines(image_dir / "README.txt", [f"synthetic {dataset}: {len(kept)} of {num_classes} classes"])


def class_limit(dataset: str) -> tuple[int, str]:
    """The most classes a synthetic ``dataset`` may have, and why: the real dataset's class count (ImageNet's for
    its variants), else ``MAX_CLASSES``."""
    real = "imagenet" if dataset in DOMAIN_DATASETS else dataset
    if real in BENCHMARK_SIZES:
        return BENCHMARK_SIZES[real][0], f"{real} has {BENCHMARK_SIZES[real][0]} classes"
    return MAX_CLASSES, f"at most {MAX_CLASSES} classes"


def check_sizes(dataset: str, num_classes: int, train_per_class: int, val_per_class: int, test_per_class: int,
                image_size: int, seed: int) -> None:
    """A one-line ``DatasetError`` for a size the layout cannot hold (see the module docstring)."""
    per_class = {"train_per_class": (train_per_class, 1), "val_per_class": (val_per_class, 0),
                 "test_per_class": (test_per_class, 1)}
    for name, value in (("num_classes", num_classes), ("image_size", image_size), ("seed", seed),
                        *((name, value) for name, (value, _) in per_class.items())):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{name} must be an integer, got {value!r}")
    most, which = class_limit(dataset)
    if not 1 <= num_classes <= most:
        raise DatasetError(f"num_classes must be 1..{most} ({which}), got {num_classes}")
    folder = get_spec(dataset).split_format == "imagefolder"  # one pool per class, split by its reader
    for name, (value, least) in per_class.items():
        if value < (0 if folder else least):
            raise DatasetError(f"{name} must be >= {0 if folder else least}, got {value}")
    total = train_per_class + val_per_class + test_per_class
    if folder and total < MIN_IMAGES_PER_CLASS:
        raise DatasetError(f"imagefolder needs at least {MIN_IMAGES_PER_CLASS} images per class (its reader splits "
                           f"each class 50/20/30), got {total}")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DatasetError(f"image_size must be 1..{MAX_IMAGE_SIZE} pixels (JPEG's limit), got {image_size}")
    if seed < 0:
        raise DatasetError(f"seed must be >= 0, got {seed}")


def write_synthetic_dataset(root: Union[str, Path], dataset: str = "dtd", convention: str = "coop",
                            num_classes: int = 6, train_per_class: int = 16, val_per_class: int = 4,
                            test_per_class: int = 10, image_size: int = 64, seed: int = 0) -> Path:
    """Write images and split files under ``root`` (the ``--root_path``); return the dataset folder.

    A test-only variant writes ``test_per_class`` images per class and ignores the train and val counts.
    Every size is checked before anything is written (``check_sizes``).
    """
    spec = get_spec(dataset)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    check_sizes(dataset, num_classes, train_per_class, val_per_class, test_per_class, image_size, seed)
    position = CONVENTIONS.index(convention)
    dataset_dir = Path(root) / spec.folders[position]
    image_dir = dataset_dir / spec.image_folders[position]
    if spec.test_only:
        write_variant(dataset, dataset_dir, image_dir, num_classes, test_per_class, image_size, seed)
        return dataset_dir
    classes = class_list(num_classes)
    classnames = [stored_classname(dataset, colour, pattern) for colour, pattern in classes]
    entries = write_class_images(
        image_dir, classnames, {"train": train_per_class, "val": val_per_class, "test": test_per_class}, seed,
        image_path=lambda label, index, serial, split: relative_path(dataset, *classes[label], label, index,
                                                                     serial, split),
        render=lambda label, rng: render_texture(*classes[label], image_size, rng), format="JPEG", quality=92)
    _write_split_files(spec, dataset_dir, entries, classnames)
    return dataset_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder that will hold the dataset folder (the --root_path)")
    parser.add_argument("--dataset", default="dtd", choices=list_datasets())
    parser.add_argument("--convention", default="coop", choices=CONVENTIONS)
    parser.add_argument("--num_classes", type=int, default=6)
    parser.add_argument("--train_per_class", type=int, default=16)
    parser.add_argument("--val_per_class", type=int, default=4)
    parser.add_argument("--test_per_class", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = write_synthetic_dataset(**vars(args))
    except (ValueError, OSError) as err:  # checked sizes, or an unwritable root: one line, nothing written
        print(f"error: {err}", file=sys.stderr)
        return 1
    layout = "class folders" if get_spec(args.dataset).split_format == "imagefolder" else f"{args.convention} layout"
    print(f"wrote synthetic {args.dataset} ({layout}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
