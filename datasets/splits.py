"""Readers of the split files that fix each benchmark's train/val/test lists.

Two formats exist. Ten datasets use a CoOp split file (Zhou et al., "Learning
to Prompt for Vision-Language Models", IJCV 2022): a JSON object with "train",
"val" and "test" lists whose entries are ``[path relative to the image folder,
label, class name]``. FGVC-Aircraft (Maji et al., 2013) keeps its own text
files, read as CoOp and CLIP-LoRA read them: ``variants.txt`` lists the class
names, one a line, and its line order gives the labels; each
``images_variant_<split>.txt`` line is ``<image id> <class name>`` for the file
``images/<image id>.jpg``. (ImageNet's class folders are read by ``imagenet.py``.)

Class names keep the file's spelling with ``_`` turned into a space, which is
what CoOp and CLIP-LoRA do when they write the prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from .base import DatasetError, Datum

SPLIT_NAMES = ("train", "val", "test")
VARIANT_CLASS_FILE = "variants.txt"

Splits = Dict[str, List[Datum]]


def clean_classname(name: str) -> str:
    """CoOp class names use underscores for spaces ("american_bulldog")."""
    return name.replace("_", " ")


def variant_list_file(split: str) -> str:
    return f"images_variant_{split}.txt"


def read_split(split_path: Path, image_dir: Path) -> Splits:
    """Read a CoOp split file into ``{"train"|"val"|"test": [Datum, ...]}``.

    Paths are made absolute under ``image_dir``; class names are cleaned.
    Malformed content raises a one-line ``DatasetError`` naming the file.
    """
    try:
        with open(split_path, "r", encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"split file is not valid JSON: {split_path} (line {exc.lineno}: {exc.msg})") from None
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {split_path} (the CoOp split file; see DATASET.md)") from None
    except OSError as exc:
        raise DatasetError(f"cannot read split file {split_path}: {exc.strerror or exc}") from None
    return parse_split(content, split_path, image_dir)


def parse_split(content, split_path: Path, image_dir: Path) -> Splits:
    """Check and convert the JSON content of a CoOp split file read from (or written to) ``split_path``."""
    if not isinstance(content, dict):
        raise DatasetError(f"split file {split_path} must hold a JSON object with 'train', 'val' and 'test' lists")
    splits: Splits = {}
    for split in SPLIT_NAMES:
        entries = content.get(split)
        if not isinstance(entries, list):
            raise DatasetError(f"split file {split_path} has no '{split}' list")
        items = []
        for index, entry in enumerate(entries):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], int) or not isinstance(entry[2], str)):
                raise DatasetError(
                    f"split file {split_path}: {split} entry {index} is not "
                    f"[relative path, integer label, class name]: {entry!r:.80}")
            relpath, label, classname = entry
            items.append(Datum(str(image_dir / relpath), label, clean_classname(classname)))
        splits[split] = items
    return splits


def classnames_from_splits(splits: Splits, source: Path) -> List[str]:
    """Class names indexed by label, checking labels are 0..C-1 with one name each."""
    names: Dict[int, str] = {}
    for split in SPLIT_NAMES:
        for item in splits[split]:
            known = names.setdefault(item.label, item.classname)
            if known != item.classname:
                raise DatasetError(
                    f"split file {source}: label {item.label} is named both '{known}' and '{item.classname}'")
    labels, count = sorted(names), len(set(names.values()))
    first_label: Dict[str, int] = {}
    for label in labels:
        other = first_label.setdefault(names[label], label)
        if other != label:
            raise DatasetError(f"split file {source}: class '{names[label]}' has two labels, {other} and {label}")
    for label in labels:
        if not 0 <= label < count:
            raise DatasetError(f"split file {source}: label {label} (class '{names[label]}') is out of range: its "
                               f"{count} classes need labels 0..{count - 1}")
    return [names[label] for label in labels]


def _read_lines(path: Path, what: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {path} ({what}; see DATASET.md)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split file {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_variant_lists(dataset_dir: Path, image_dir: Path) -> Tuple[Splits, List[str]]:
    """FGVC-Aircraft's splits and class names; an unknown class names the list file and line."""
    classes_path = dataset_dir / VARIANT_CLASS_FILE
    classnames = [line.strip() for line in _read_lines(classes_path, "FGVC-Aircraft's class list") if line.strip()]
    if not classnames:
        raise DatasetError(f"split file {classes_path} lists no classes")
    label_of: Dict[str, int] = {}
    for label, name in enumerate(classnames):
        if label_of.setdefault(name, label) != label:
            raise DatasetError(f"split file {classes_path} lists class '{name}' twice")
    splits: Splits = {}
    for split in SPLIT_NAMES:
        list_path = dataset_dir / variant_list_file(split)
        items = []
        for number, line in enumerate(_read_lines(list_path, f"FGVC-Aircraft's {split} list"), start=1):
            image_id, _, variant = line.strip().partition(" ")
            if not image_id:
                continue
            if variant not in label_of:
                raise DatasetError(f"unknown class '{variant}' in {list_path} line {number} "
                                   f"(not listed in {classes_path})")
            items.append(Datum(str(image_dir / f"{image_id}.jpg"), label_of[variant], clean_classname(variant)))
        splits[split] = items
    return splits, [clean_classname(name) for name in classnames]
