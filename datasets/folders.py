"""Listing class folders and the image files inside them, in torchvision ``ImageFolder`` order.

Used by ImageNet (whose CLIP-LoRA reader is ``torchvision.datasets.ImageFolder``)
and by ``imagefolder`` (a researcher's own folder of images). Class folders and
files are sorted by name, as ``ImageFolder`` sorts them; a file is an image when
its extension, in any case, is one of ``ImageFolder``'s. Names starting with a
dot (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``) are skipped, and only
files directly inside a class folder are listed. Files are told apart from
folders by name alone, so listing 1.28M ImageNet files costs one directory read
per class and no per-file ``stat``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from .base import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _entries(folder: Path, what: str):
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {folder}") from None
    except OSError as exc:
        raise DatasetError(f"cannot list {what} {folder}: {exc.strerror or exc}") from None


def list_class_folders(folder: Path) -> List[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``; an error when there are none."""
    names = sorted(entry.name for entry in _entries(folder, "image folder")
                   if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DatasetError(f"no class folders in {folder} (expected one sub-folder of images per class)")
    return names


def list_image_files(class_dir: Path) -> List[str]:
    """Sorted image file names in ``class_dir``; an error naming the folder when it holds none."""
    try:
        names = os.listdir(class_dir)
    except OSError as exc:
        raise DatasetError(f"cannot list class folder {class_dir}: {exc.strerror or exc}") from None
    images = sorted(name for name in names if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise DatasetError(f"class folder has no images: {class_dir} (expected {', '.join(IMAGE_EXTENSIONS)} files)")
    return images
