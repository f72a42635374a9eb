"""A researcher's own images: one folder per class, split once into train/val/test.

``build_dataset("imagefolder", DIR, ...)`` reads ``DIR/<class name>/<image>``
(class folders and files in ``folders.py`` order: sorted, images by extension in
any case, hidden and other files skipped). The first run splits every class as
CoOp splits datasets without an official split (Zhou et al., IJCV 2022,
``read_and_split_data``): the class's files are shuffled and the first
round(50%) go to train, the next round(20%) to val, the rest (about 30%) to
test. One ``random.Random(0)`` shuffles the classes in label order, so the split
does not depend on the run's seed. It is written atomically to
``DIR/split_imagefolder.json`` in the CoOp split format and read from there on
every later run; the few-shot draw is then the one of the other datasets.

If the folder's images change after the split was written (files added,
removed or renamed), loading stops with an error that says how and asks to
delete the split file, so no run silently uses a stale or partial split. Two
class folders whose names give one class name (``blue jay`` and ``blue_jay``: an
underscore reads as a space, as in the benchmarks) are an error naming both,
before any split is written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Tuple

from lora_zoo.files import write_json

from .base import DatasetError
from .folders import list_class_folders, list_image_files
from .splits import SPLIT_NAMES, clean_classname

SPLIT_FILE = "split_imagefolder.json"
TRAIN_FRACTION = 0.5
VAL_FRACTION = 0.2
SPLIT_SEED = 0
MIN_IMAGES_PER_CLASS = 4  # fewer leave a split empty under the 50/20/30 rounding


def scan_image_folder(image_dir: Path) -> Dict[str, List[str]]:
    """Sorted class folder names → sorted image names; errors name the folder at fault."""
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir} (expected one sub-folder of images per class)")
    folders = list_class_folders(image_dir)
    seen: Dict[str, str] = {}
    for name in folders:
        other = seen.setdefault(clean_classname(name), name)
        if other != name:
            raise DatasetError(f"class folders '{other}' and '{name}' in {image_dir} both name the class "
                               f"'{clean_classname(name)}' (an underscore reads as a space); rename or merge one")
    return {name: list_image_files(image_dir / name) for name in folders}


def make_split(image_dir: Path, files_per_class: Dict[str, List[str]]) -> Dict[str, list]:
    """The deterministic 50/20/30 split in CoOp's JSON structure (paths relative to ``image_dir``)."""
    rng = random.Random(SPLIT_SEED)
    split: Dict[str, list] = {part: [] for part in SPLIT_NAMES}
    for label, (classname, names) in enumerate(files_per_class.items()):
        if len(names) < MIN_IMAGES_PER_CLASS:
            raise DatasetError(f"class folder {image_dir / classname} has {len(names)} images; the "
                               f"50/20/30 train/val/test split needs at least {MIN_IMAGES_PER_CLASS}")
        shuffled = list(names)
        rng.shuffle(shuffled)
        n_train = round(len(shuffled) * TRAIN_FRACTION)
        n_val = round(len(shuffled) * VAL_FRACTION)
        parts = {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val],
                 "test": shuffled[n_train + n_val:]}
        for part, chosen in parts.items():
            split[part].extend([f"{classname}/{name}", label, classname] for name in chosen)
    return split


def _read_existing(split_path: Path) -> Tuple[dict, set]:
    """The split's content and the relative paths it lists."""
    try:
        content = json.loads(split_path.read_text(encoding="utf-8"))
        return content, {entry[0] for part in SPLIT_NAMES for entry in content[part]}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise DatasetError(f"split file {split_path} is unreadable or not a CoOp split; delete it to split "
                           f"{split_path.parent} again") from None


def prepare_split(image_dir: Path, write: bool = True) -> Tuple[Path, dict]:
    """``(split file path, split content)``: the file's when it exists, else a new split, written when ``write``.

    An existing split must list exactly the images on disk. ``datasets.check`` passes ``write=False``.
    """
    split_path = image_dir / SPLIT_FILE
    files_per_class = scan_image_folder(image_dir)
    if not split_path.exists():
        content = make_split(image_dir, files_per_class)
        if write:
            try:
                write_json(split_path, content)
            except OSError as err:
                raise DatasetError(f"cannot write the split file: {err}") from None
        return split_path, content
    content, listed = _read_existing(split_path)
    on_disk = {f"{classname}/{name}" for classname, names in files_per_class.items() for name in names}
    if listed != on_disk:
        added, removed = sorted(on_disk - listed), sorted(listed - on_disk)
        raise DatasetError(f"images in {image_dir} changed since {split_path} was written ({len(added)} added, "
                           f"{len(removed)} removed, e.g. {(added or removed)[0]}); delete {split_path} to split again")
    return split_path, content
