"""Procedural textures for the synthetic datasets: one (colour, pattern) pair per class.

Patterns are stripes, checks, dots, waves, rings, zigzags, diagonals and grids
in six colours, so a model can learn the classes; each image varies in phase,
scale, orientation, colour and noise, drawn from the numpy generator it is given.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

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
    """(colour, pattern) per class; consecutive classes differ in both pattern and colour.

    After the 48 pairs the patterns come again at a finer scale, numbered ("stripes2", then "stripes3" ...),
    so that a tree can have a real benchmark's class count (SUN397's 397).
    """
    colours, patterns = list(COLOURS), list(PATTERNS)
    pairs = len(colours) * len(patterns)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    out = []
    for index in range(num_classes):
        cycle, within = divmod(index, pairs)
        colour = colours[(within % len(patterns) + within // len(patterns)) % len(colours)]
        out.append((colour, patterns[within % len(patterns)] + (str(cycle + 1) if cycle else "")))
    return out


def render_texture(colour: str, pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An ``size``x``size``x3 uint8 image of ``pattern`` in ``colour`` with random variation."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    angle = rng.uniform(-0.3, 0.3)  # small rotation keeps the pattern's identity
    x, y = np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y
    base = pattern.rstrip("0123456789")
    freq = 4.0 * rng.uniform(0.85, 1.15) * (1 + 0.5 * (int(pattern[len(base):] or 1) - 1))
    mask = PATTERNS[base](x, y, freq, rng.uniform(0.0, 1.0))
    foreground = np.clip(np.array(COLOURS[colour], np.float32) / 255 + rng.normal(0, 0.05, 3), 0, 1)
    background = np.full(3, rng.uniform(0.05, 0.25), np.float32)
    image = background * (1 - mask[..., None]) + foreground * mask[..., None]
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
