"""Verify that datasets are laid out as ``build_dataset`` expects.

    python -m datasets.check --root_path /data [--dataset dtd] [--decode]

For each dataset (all registered ones found under the root when ``--dataset``
is not given) it prints the folder used, the number of classes, per-split
counts and the first problems found: missing folders or split file, malformed
JSON, images listed in the split but absent on disk and, with ``--decode``,
images that cannot be decoded. The exit status is 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .base import SPLIT_NAMES, DatasetError, classnames_from_splits, load_image, read_split
from .registry import get_spec, list_datasets, locate_dataset

MAX_LISTED = 10


def check_dataset(name: str, root_path: str, decode: bool = False, out=sys.stdout) -> List[str]:
    """Print a report for one dataset and return its problems (empty when all is well)."""
    try:
        dataset_dir, image_dir, split_path = locate_dataset(name, root_path)
        splits = read_split(split_path, image_dir)
        classnames = classnames_from_splits(splits, split_path)
    except DatasetError as exc:
        print(f"{name}: {exc}", file=out)
        return [str(exc)]
    convention = "coop" if dataset_dir.name == get_spec(name).folders[0] else "clip_lora"
    print(f"{name}: {dataset_dir} ({convention} layout)", file=out)
    print(f"  classes: {len(classnames)}", file=out)
    problems: List[str] = []
    for split in SPLIT_NAMES:
        items = splits[split]
        per_class = {}
        for item in items:
            per_class[item.label] = per_class.get(item.label, 0) + 1
        fewest = min(per_class.values()) if per_class else 0
        print(f"  {split}: {len(items)} images, {len(per_class)} classes, fewest per class: {fewest}", file=out)
        if not items and split != "val":
            problems.append(f"{split} split is empty in {split_path}")
        for item in items:
            if not os.path.exists(item.impath):
                problems.append(f"missing file ({split}): {item.impath}")
            elif decode:
                try:
                    load_image(item.impath)
                except DatasetError as exc:
                    problems.append(f"{exc} ({split})")
    if problems:
        print(f"  PROBLEMS: {len(problems)} (first {min(len(problems), MAX_LISTED)} below)", file=out)
        for problem in problems[:MAX_LISTED]:
            print(f"    {problem}", file=out)
    else:
        print("  OK", file=out)
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Check few-shot dataset folders and CoOp split files.")
    parser.add_argument("--root_path", required=True, help="folder holding dtd/, food-101/, oxford_pets/ (or DTD/...)")
    parser.add_argument("--dataset", choices=list_datasets(), help="check only this dataset")
    parser.add_argument("--decode", action="store_true", help="also decode every image (slow on full datasets)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root_path):
        print(f"root_path not found: {args.root_path}")
        return 1
    if args.dataset:
        names = [args.dataset]
    else:
        names = [name for name in list_datasets()
                 if any(os.path.isdir(os.path.join(args.root_path, folder)) for folder in get_spec(name).folders)]
        if not names:
            folders = ", ".join(folder for name in list_datasets() for folder in get_spec(name).folders)
            print(f"no dataset folder found in {args.root_path} (looked for {folders})")
            return 1
    failed = [name for name in names if check_dataset(name, args.root_path, decode=args.decode)]
    print(f"checked {len(names)} dataset(s): " + (f"problems in {', '.join(failed)}" if failed else "all OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
