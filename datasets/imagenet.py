"""ImageNet (Deng et al., CVPR 2009) read from its class folders and drawn as CLIP-LoRA draws it.

Two layouts under ``$ROOT/imagenet/``: CoOp's (Zhou et al., IJCV 2022)
``images/train/<wnid>/`` and ``images/val/<wnid>/``; CLIP-LoRA's (Zanella &
Ben Ayed, CVPRW 2024) ``train/<wnid>/`` and ``val/<wnid>/``. Both need
``classnames.txt``, CoOp's file of ``<wnid> <class name>`` lines (``_`` in a
name becomes a space, as for the other datasets).

Labels are the positions of the wnid folders of ``train/`` sorted by name, and
files are sorted within a class: the order of ``torchvision.datasets.ImageFolder``,
which CLIP-LoRA uses. CLIP-LoRA's draw differs from the other datasets: one
``rng.sample(files, K + min(K, 4))`` per class, classes in label order; the
first K files are the training shots and the rest the validation images, both
from ``train/``. The test split is every image of ``val/`` (the 50,000 official
validation images). Only the drawn files and the test list are kept: a class's
file names are listed, sampled and dropped before the next class is read.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from .base import MAX_VAL_SHOTS, DatasetError, Datum, check_shots
from .folders import list_class_folders, list_image_files
from .splits import clean_classname

CLASSNAMES_FILE = "classnames.txt"
TRAIN_FOLDER = "train"
TEST_FOLDER = "val"


def read_classname_file(path: Path) -> Dict[str, str]:
    """``{wnid: class name}`` from ``<wnid> <class name>`` lines, in the file's order, names cleaned."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"class-name file not found: {path} (one '<wnid> <class name>' line per class, "
                           "CoOp's classnames.txt; see DATASET.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read class-name file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    name_of = {}
    for line in lines:
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            name_of[wnid] = clean_classname(name)
    return name_of


def read_classnames(path: Path, wnids: List[str]) -> List[str]:
    """Class name of each wnid, from ``<wnid> <class name>`` lines; any unlisted wnid is an error."""
    name_of = read_classname_file(path)
    missing = [wnid for wnid in wnids if wnid not in name_of]
    if missing:
        raise DatasetError(f"class folder '{missing[0]}' has no line in {path} ({len(missing)} of {len(wnids)} "
                           "class folders are not listed)")
    return [name_of[wnid] for wnid in wnids]


def read_class_folders(image_dir: Path, classnames_path: Path) -> Tuple[List[str], List[str]]:
    """``(wnids, classnames)`` in label order; ``val/`` must hold the same class folders as ``train/``."""
    train_dir, test_dir = image_dir / TRAIN_FOLDER, image_dir / TEST_FOLDER
    wnids = list_class_folders(train_dir)
    test_wnids = list_class_folders(test_dir)
    if test_wnids != wnids:
        extra = sorted(set(test_wnids) ^ set(wnids))
        raise DatasetError(f"class folders of {test_dir} differ from those of {train_dir} "
                           f"({len(test_wnids)} vs {len(wnids)}; first difference: {extra[0] if extra else '-'})")
    return wnids, read_classnames(classnames_path, wnids)


def iter_class_files(split_dir: Path, wnids: List[str]) -> Iterator[Tuple[int, Path, List[str]]]:
    """``(label, class folder, sorted image names)`` for each class, one folder read at a time."""
    for label, wnid in enumerate(wnids):
        class_dir = split_dir / wnid
        yield label, class_dir, list_image_files(class_dir)


def sample_imagenet(image_dir: Path, wnids: List[str], classnames: List[str], shots: int,
                    seed: int) -> Tuple[List[Datum], List[Datum]]:
    """CLIP-LoRA's ImageNet draw: per class, K training and min(K, 4) validation files from ``train/``."""
    check_shots(shots)
    val_shots = min(shots, MAX_VAL_SHOTS)
    rng = random.Random(seed)
    train: List[Datum] = []
    val: List[Datum] = []
    for label, class_dir, names in iter_class_files(image_dir / TRAIN_FOLDER, wnids):
        if len(names) < shots + val_shots:
            raise DatasetError(f"class folder {class_dir} has {len(names)} images; {shots} shots + {val_shots} "
                               f"validation images need {shots + val_shots} (both are drawn from {TRAIN_FOLDER}/)")
        drawn = rng.sample(names, shots + val_shots)
        train.extend(Datum(str(class_dir / name), label, classnames[label]) for name in drawn[:shots])
        val.extend(Datum(str(class_dir / name), label, classnames[label]) for name in drawn[shots:])
    return train, val


def imagenet_test(image_dir: Path, wnids: List[str], classnames: List[str]) -> List[Datum]:
    """Every image of ``val/``, in ``ImageFolder`` order."""
    return [Datum(str(class_dir / name), label, classnames[label])
            for label, class_dir, names in iter_class_files(image_dir / TEST_FOLDER, wnids) for name in names]
