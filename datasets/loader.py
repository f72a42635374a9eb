"""Data loaders for few-shot training and evaluation, with numbers that do not depend on the worker count.

Training (``TrainStream``): an endless stream of batches, epoch after epoch, as the
CLIP-LoRA loop cycles its loader (Zanella & Ben Ayed, CVPRW 2024). Each epoch's order
is a permutation drawn from ``(seed, epoch)`` and every sample's augmentation is
seeded from ``(seed, epoch, index)`` inside ``__getitem__`` (torch's RNG is forked,
so the caller's state is untouched). Hence the same seed gives the same batches with
0 or 8 workers, and a run resumed at step k (``start_step``) sees exactly the batches
an uninterrupted run sees from step k on. Decoded train images come from an
in-memory cache (``cache.DecodedImages``) when one is given: the same PIL image the
disk read would give, decoded once.

Evaluation and calibration (``build_data_loader``): the images in order.

A file that cannot be read or decoded raises a one-line ``DatasetError`` naming it in
the main process: a worker returns a marker instead of raising, so no worker
traceback is printed.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from lora_zoo.host import available_cpus

from .base import DatasetError, Datum, load_image

MAX_DEFAULT_WORKERS = 8
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), the same on every platform."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state >> 1


def seed_augmentation(seed: int, epoch: int, index: int) -> None:
    """Seed the CPU generator for the augmentation draws of sample ``index`` in ``epoch`` (``mix_seed``).

    Both augmentation paths call it (``AugmentedImages`` and ``device_augment``), so a sample's crop
    and flip do not depend on where its pixels are processed. Only the CPU generator is seeded: the
    CUDA one (dropout on the device) is left alone when augmenting in the training process.
    """
    torch.default_generator.manual_seed(mix_seed(seed, epoch, index))


class Unreadable(NamedTuple):
    """What a worker returns for an image it cannot read (raised as ``DatasetError`` by the caller)."""

    message: str


def collate(batch):
    """``default_collate``, or the first ``Unreadable`` of the batch."""
    for item in batch:
        if isinstance(item, Unreadable):
            return item
    return default_collate(batch)


def default_num_workers(device_type: str = "cuda") -> int:
    """Loader workers: none on CPU (decoding is cheap next to a CPU training step and would take cores
    from it), else min(8, available CPUs)."""
    return 0 if device_type == "cpu" else min(MAX_DEFAULT_WORKERS, available_cpus())


class ImageList(Dataset):
    """``(transform(image), label)`` for each ``Datum``, in order; ``images`` may serve decoded images."""

    def __init__(self, data: Sequence[Datum], transform: Optional[Callable], images=None):
        self.data, self.transform, self.images = list(data), transform, images

    def __len__(self) -> int:
        return len(self.data)

    def image(self, index: int):
        cached = self.images.get(index) if self.images is not None else None
        return cached if cached is not None else load_image(self.data[index].impath)

    def __getitem__(self, index: int):
        try:
            image = self.image(index)
        except DatasetError as err:
            return Unreadable(str(err))
        return (self.transform(image) if self.transform is not None else image), self.data[index].label


class AugmentedImages(ImageList):
    """Training samples keyed ``(epoch, index)``: the augmentation is seeded from ``(seed, epoch, index)``."""

    def __init__(self, data, transform, seed: int, images=None):
        super().__init__(data, transform, images)
        self.seed = seed

    def __getitem__(self, key):
        epoch, index = key
        try:
            image = self.image(index)
        except DatasetError as err:
            return Unreadable(str(err))
        with torch.random.fork_rng(devices=[]):
            seed_augmentation(self.seed, epoch, index)
            return self.transform(image), self.data[index].label


class EpochBatches(Sampler):
    """Batches of ``(epoch, index)`` forever, from ``start_step``; each epoch a permutation from (seed, epoch).

    ``drop_last``: an epoch holds only full batches, as Dassl's loader forms them (all of one short batch when
    the set is smaller than a batch); otherwise its last batch is short."""

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0, drop_last: bool = False):
        self.size, self.batch_size, self.seed, self.start_step = size, batch_size, seed, start_step
        self.per_epoch = size // batch_size if drop_last and size >= batch_size else -(-size // batch_size)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.per_epoch)
        while True:
            order = self.order(epoch)
            for start in range(skip * self.batch_size, min(self.size, self.per_epoch * self.batch_size),
                               self.batch_size):
                yield [(epoch, index) for index in order[start:start + self.batch_size]]
            epoch, skip = epoch + 1, 0


def _raise_unreadable(batches) -> Iterator:
    for batch in batches:
        if isinstance(batch, Unreadable):
            raise DatasetError(batch.message)
        yield batch


def _loader(dataset, num_workers: Optional[int], pin_memory: Optional[bool], **kwargs) -> DataLoader:
    """A DataLoader with its own generator: starting an iteration never draws from the global RNG
    (a resumed run restores that RNG and must see the same draws as an uninterrupted one). ``num_workers=None``
    is ``default_num_workers`` of the device this process trains on: CUDA when available, else the CPU."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    workers = default_num_workers(device_type) if num_workers is None else int(num_workers)
    return DataLoader(dataset, num_workers=workers, collate_fn=collate, generator=torch.Generator().manual_seed(0),
                      pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory), **kwargs)


class Loader:
    """Iterable over ``(images, labels)`` batches of a DataLoader; unreadable files raise ``DatasetError``."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return _raise_unreadable(self.loader)


class TrainStream(Loader):
    """Endless training batches (see the module docstring); ``iter`` starts at ``start_step``."""

    def __init__(self, data: Sequence[Datum], transform: Callable, batch_size: int, seed: int,
                 num_workers: Optional[int] = None, start_step: int = 0, images=None,
                 pin_memory: Optional[bool] = None, drop_last: bool = False):
        if len(data) == 0:
            raise DatasetError("cannot train on an empty list of images")
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = EpochBatches(len(data), batch_size, seed, start_step, drop_last)
        super().__init__(_loader(AugmentedImages(data, transform, seed, images), num_workers, pin_memory,
                                 batch_sampler=self.sampler))


def build_data_loader(data: Sequence[Datum], transform: Optional[Callable], batch_size: int = 32,
                      num_workers: Optional[int] = None, pin_memory: Optional[bool] = None, images=None) -> Loader:
    """Batches ``(images [B,3,H,W] float, labels [B] long)`` of ``data`` in order (evaluation, calibration).

    ``num_workers=None`` uses none without CUDA, else min(8, available CPUs); ``pin_memory=None`` pins when
    CUDA is available.
    """
    if len(data) == 0:
        raise DatasetError("cannot build a data loader from an empty list of images")
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    return Loader(_loader(ImageList(data, transform, images), num_workers, pin_memory, batch_size=batch_size,
                          shuffle=False, persistent_workers=False))
