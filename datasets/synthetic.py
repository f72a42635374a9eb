"""Write a small procedural-texture dataset in the exact on-disk layout of a real benchmark.

Each class is a (colour, pattern) pair — stripes, checks, dots, waves, rings,
zigzags, diagonals, grids — so a model can learn it; each image varies in
phase, scale, orientation, colour and noise. Files and the CoOp-format split
JSON follow the chosen dataset (``dtd``/``food101``: ``images/<class>/<file>.jpg``;
``oxford_pets``: flat ``images/Class_Name_12.jpg``) and folder convention
(``coop`` or ``clip_lora``), so tests and the CPU demo use the same reader as
real data. Output is deterministic in ``seed``.

    python -m datasets.synthetic --root /tmp/data --dataset dtd --convention coop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import numpy as np
from PIL import Image

from .registry import IMAGE_FOLDER, get_spec, list_datasets

CONVENTIONS = ("coop", "clip_lora")

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60),
    "yellow": (230, 200, 40), "purple": (150, 60, 190), "orange": (240, 130, 30),
}


def _stripes(x, y, freq, phase):
    return 0.5 + 0.5 * np.sin(2 * np.pi * (freq * x + phase))


def _checks(x, y, freq, phase):
    return ((np.floor(freq * x + phase) + np.floor(freq * y + phase)) % 2).astype(np.float32)


def _dots(x, y, freq, phase):
    dx = (freq * x + phase) % 1.0 - 0.5
    dy = (freq * y + phase) % 1.0 - 0.5
    return (dx ** 2 + dy ** 2 < 0.09).astype(np.float32)


def _waves(x, y, freq, phase):
    return 0.5 + 0.5 * np.sin(2 * np.pi * (freq * y + 0.15 * np.sin(2 * np.pi * 2 * x) + phase))


def _rings(x, y, freq, phase):
    radius = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 * freq * radius + phase))


def _zigzag(x, y, freq, phase):
    tooth = np.abs((2 * freq * x) % 2.0 - 1.0) * 0.25
    return (((freq * y + tooth + phase) % 1.0) < 0.5).astype(np.float32)


def _diagonal(x, y, freq, phase):
    return (((freq * (x + y) + phase) % 1.0) < 0.4).astype(np.float32)


def _grid(x, y, freq, phase):
    lines_x = ((freq * x + phase) % 1.0) < 0.2
    lines_y = ((freq * y + phase) % 1.0) < 0.2
    return (lines_x | lines_y).astype(np.float32)


PATTERNS: Dict[str, Callable] = {
    "stripes": _stripes, "checks": _checks, "dots": _dots, "waves": _waves,
    "rings": _rings, "zigzag": _zigzag, "diagonal": _diagonal, "grid": _grid,
}


def class_list(num_classes: int) -> List[Tuple[str, str]]:
    """(colour, pattern) per class; consecutive classes differ in both pattern and colour."""
    colours, patterns = list(COLOURS), list(PATTERNS)
    limit = len(colours) * len(patterns)
    if not 1 <= num_classes <= limit:
        raise ValueError(f"num_classes must be in 1..{limit}, got {num_classes}")
    return [(colours[(index % len(patterns) + index // len(patterns)) % len(colours)], patterns[index % len(patterns)])
            for index in range(num_classes)]


def render_texture(colour: str, pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An ``size``x``size``x3 uint8 image of ``pattern`` in ``colour`` with random variation."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    angle = rng.uniform(-0.3, 0.3)  # small rotation keeps the pattern's identity
    x, y = np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y
    freq = 4.0 * rng.uniform(0.85, 1.15)
    mask = PATTERNS[pattern](x, y, freq, rng.uniform(0.0, 1.0))
    foreground = np.clip(np.array(COLOURS[colour], np.float32) / 255 + rng.normal(0, 0.05, 3), 0, 1)
    background = np.full(3, rng.uniform(0.05, 0.25), np.float32)
    image = background * (1 - mask[..., None]) + foreground * mask[..., None]
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _relative_path(dataset: str, classname: str, index: int) -> str:
    if dataset == "oxford_pets":
        return f"{classname.title()}_{index + 1}.jpg"  # flat, like Abyssinian_12.jpg
    if dataset == "food101":
        return f"{classname}/{100000 + index}.jpg"
    return f"{classname}/{classname}_{index + 1:04d}.jpg"


def write_synthetic_dataset(root: Union[str, Path], dataset: str = "dtd", convention: str = "coop",
                            num_classes: int = 6, train_per_class: int = 16, val_per_class: int = 4,
                            test_per_class: int = 10, image_size: int = 64, seed: int = 0) -> Path:
    """Write images and the split JSON under ``root``; return the dataset folder."""
    spec = get_spec(dataset)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    dataset_dir = Path(root) / spec.folders[CONVENTIONS.index(convention)]
    image_dir = dataset_dir / IMAGE_FOLDER
    image_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    splits: Dict[str, list] = {split: [] for split in counts}
    for label, (colour, pattern) in enumerate(class_list(num_classes)):
        classname = f"{colour}_{pattern}"
        index = 0
        for split_index, (split, count) in enumerate(counts.items()):
            for _ in range(count):
                rng = np.random.default_rng([seed, label, split_index, index])
                relpath = _relative_path(dataset, classname, index)
                (image_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render_texture(colour, pattern, image_size, rng)).save(
                    image_dir / relpath, quality=92)
                splits[split].append([relpath, label, classname])
                index += 1
    with open(dataset_dir / spec.split_file, "w", encoding="utf-8") as handle:
        json.dump(splits, handle)
    return dataset_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder that will hold the dataset folder")
    parser.add_argument("--dataset", default="dtd", choices=list_datasets())
    parser.add_argument("--convention", default="coop", choices=CONVENTIONS)
    parser.add_argument("--num_classes", type=int, default=6)
    parser.add_argument("--train_per_class", type=int, default=16)
    parser.add_argument("--val_per_class", type=int, default=4)
    parser.add_argument("--test_per_class", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_synthetic_dataset(**vars(args))
    print(f"wrote synthetic {args.dataset} ({args.convention} layout) to {path}")


if __name__ == "__main__":
    main()
