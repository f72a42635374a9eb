"""Turn a list of ``Datum`` into a torch ``DataLoader`` that keeps a GPU fed.

Workers decode JPEGs in parallel, batches go to pinned memory when CUDA is
present, workers persist across epochs, and shuffling uses a generator seeded
per run so the order is reproducible. A file that cannot be decoded raises a
``DatasetError`` naming it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .base import DatasetError, Datum, load_image

MAX_DEFAULT_WORKERS = 8


class ImageListDataset(Dataset):
    """``(transform(image), label)`` for each ``Datum``."""

    def __init__(self, data: Sequence[Datum], transform: Optional[Callable] = None):
        self.data = list(data)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item = self.data[index]
        image = load_image(item.impath)
        if self.transform is not None:
            image = self.transform(image)
        return image, item.label


def default_num_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        cpus = os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, cpus)


def build_data_loader(data: Sequence[Datum], transform: Optional[Callable], batch_size: int = 32,
                      shuffle: bool = False, num_workers: Optional[int] = None, drop_last: bool = False,
                      seed: Optional[int] = None, pin_memory: Optional[bool] = None) -> DataLoader:
    """A loader yielding ``(images [B,3,H,W] float, labels [B] long)``.

    ``num_workers=None`` uses min(8, available CPUs); ``pin_memory=None`` pins
    when CUDA is available; ``seed`` fixes the shuffle order (and the workers'
    augmentation seeds).
    """
    if len(data) == 0:
        raise DatasetError("cannot build a data loader from an empty list of images")
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    workers = default_num_workers() if num_workers is None else int(num_workers)
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return DataLoader(
        ImageListDataset(data, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        persistent_workers=workers > 0,
        generator=generator,
    )
