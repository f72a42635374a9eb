"""Verify that datasets are laid out as ``build_dataset`` expects.

    python -m datasets.check --root_path /data [--dataset dtd] [--decode]
    python -m datasets.check --root_path /data/my_images --dataset imagefolder

For each dataset (every benchmark and test-only ImageNet variant found under
the root when ``--dataset`` is not given) it prints the folder and convention used, the number of classes,
per-split counts and the first problems found: missing folders or split files,
malformed split files, classes unknown to the class list, class folders without
images, images listed in a split but absent on disk and, with ``--decode``,
images that cannot be decoded or cannot be read right as 8-bit RGB: samples
with no defined 8-bit range (floating-point, 32-bit integer) are listed by name,
16-bit ones pass (``load_image`` scales them, as every run does). ``imagefolder``'s
split file is not written by the check. The exit status is 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterable, List, Optional

from .base import DatasetError, load_image
from .folders import list_image_files
from .imagenet import TEST_FOLDER, TRAIN_FOLDER, read_class_folders
from .imagenet_variants import variant_classes
from .registry import (BENCHMARK_DATASETS, DOMAIN_DATASETS, Location, get_spec, list_datasets, listing_file,
                       locate_dataset, read_splits)
from .splits import SPLIT_NAMES

MAX_LISTED = 10


def _print_counts(split: str, counts: Dict[int, int], out) -> None:
    fewest = min(counts.values()) if counts else 0
    print(f"  {split}: {sum(counts.values())} images, {len(counts)} classes, fewest per class: {fewest}", file=out)


def _check_files(split: str, paths: Iterable[str], decode: bool, listed: bool, problems: List[str]) -> None:
    """Existence (for files named by a split file) and, with ``decode``, decoding of each image."""
    for path in paths:
        if listed and not os.path.exists(path):
            problems.append(f"missing file ({split}): {path}")
        elif decode:
            try:
                load_image(path)
            except DatasetError as exc:
                problems.append(f"{exc} ({split})")


def _check_listed(name: str, location: Location, decode: bool, problems: List[str], out) -> None:
    """Datasets whose split lists every image."""
    spec = get_spec(name)
    splits, classnames = read_splits(spec, location, write_split=False)
    print(f"  classes: {len(classnames)}", file=out)
    if spec.split_format == "imagefolder":
        state = "reused" if location.split_path.exists() else "not written yet; the first run writes it"
        print(f"  split file: {location.split_path} ({state})", file=out)
    for split in SPLIT_NAMES:
        counts: Dict[int, int] = {}
        for item in splits[split]:
            counts[item.label] = counts.get(item.label, 0) + 1
        _print_counts(split, counts, out)
        if not splits[split] and split != "val":
            problems.append(f"{split} split is empty in {listing_file(spec, location, split)}")
        _check_files(split, (item.impath for item in splits[split]), decode, True, problems)


def _check_class_folders(location: Location, decode: bool, problems: List[str], out) -> None:
    """ImageNet: counts per class folder of ``train/`` and ``val/``."""
    wnids, _ = read_class_folders(location.image_dir, location.split_path)
    print(f"  classes: {len(wnids)} (names from {location.split_path.name})", file=out)
    for split, folder in (("train", TRAIN_FOLDER), ("test", TEST_FOLDER)):
        counts: Dict[int, int] = {}
        for label, wnid in enumerate(wnids):
            class_dir = location.image_dir / folder / wnid
            try:
                names = list_image_files(class_dir)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            counts[label] = len(names)
            _check_files(split, (str(class_dir / name) for name in names), decode, False, problems)
        _print_counts(f"{split} ({folder}/)", counts, out)
        if split == "train":
            print(f"  val: drawn from {TRAIN_FOLDER}/ with the training shots, min(K, 4) per class", file=out)


def _check_test_only(name: str, location: Location, decode: bool, problems: List[str], out) -> None:
    """An ImageNet variant: its classes and the images of each class folder (the test split, all it has)."""
    folders, _ = variant_classes(get_spec(name).split_format, location.image_dir, location.split_path)
    print(f"  classes: {len(folders)} (names from {location.split_path.name}); test only", file=out)
    counts: Dict[int, int] = {}
    for label, folder in enumerate(folders):
        try:
            names = list_image_files(location.image_dir / folder)
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        counts[label] = len(names)
        _check_files("test", (str(location.image_dir / folder / n) for n in names), decode, False, problems)
    _print_counts("test", counts, out)


def check_dataset(name: str, root_path: str, decode: bool = False, out=None) -> List[str]:
    """Print a report for one dataset (to ``out``, default ``sys.stdout``) and return its problems (none: all well)."""
    out = out or sys.stdout
    problems: List[str] = []
    try:
        location = locate_dataset(name, root_path)
        print(f"{name}: {location.dataset_dir} ({location.convention} layout)", file=out)
        if get_spec(name).split_format == "class_folders":
            _check_class_folders(location, decode, problems, out)
        elif get_spec(name).test_only:
            _check_test_only(name, location, decode, problems, out)
        else:
            _check_listed(name, location, decode, problems, out)
    except DatasetError as exc:
        print(f"{name}: {exc}", file=out)
        return [str(exc)]
    if problems:
        print(f"  PROBLEMS: {len(problems)} (first {min(len(problems), MAX_LISTED)} below)", file=out)
        for problem in problems[:MAX_LISTED]:
            print(f"    {problem}", file=out)
    else:
        print("  OK", file=out)
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Check few-shot dataset folders and their split files.")
    parser.add_argument("--root_path", required=True,
                        help="folder holding dtd/, imagenet/, ... (or DTD/, ...); for imagefolder the class folders")
    parser.add_argument("--dataset", choices=list_datasets(), help="check only this dataset")
    parser.add_argument("--decode", action="store_true", help="also decode every image (slow on full datasets)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root_path):
        print(f"root_path not found: {args.root_path}")
        return 1
    if args.dataset:
        names = [args.dataset]
    else:
        names = [name for name in (*BENCHMARK_DATASETS, *DOMAIN_DATASETS)
                 if any(os.path.isdir(os.path.join(args.root_path, folder)) for folder in get_spec(name).folders)]
        if not names:
            folders = ", ".join(dict.fromkeys(folder for name in (*BENCHMARK_DATASETS, *DOMAIN_DATASETS)
                                              for folder in get_spec(name).folders))
            print(f"no dataset folder found in {args.root_path} (looked for {folders}; "
                  "use --dataset imagefolder for a folder of class folders)")
            return 1
    failed = [name for name in names if check_dataset(name, args.root_path, decode=args.decode)]
    print(f"checked {len(names)} dataset(s): " + (f"problems in {', '.join(failed)}" if failed else "all OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
