"""Caches that change how fast images arrive, never which numbers they give.

``DecodedImages``: the few-shot train set decoded once into memory (PIL RGB images,
exactly what ``load_image`` returns), bounded by ``limit_mb``; images past the bound
are read from disk at every use. An image counts as 4 bytes a pixel, what Pillow
allocates for RGB (32-bit pixels, the fourth byte unused). A few-shot train set is
a few thousand images that a run augments hundreds of times each, so decoding
dominates the data cost without it. Decoding runs in threads (PIL releases the GIL while decoding).

``PreprocessedImages``: a test split after the deterministic part of its transform
(resize, centre crop; everything before ``ToTensor``) as one uint8 array
``(N, 3, H, W)`` in a ``.npy`` file, memory-mapped, shared by every run of a sweep
on the same dataset and preprocessing. ``ToTensor``'s ``/255`` and ``Normalize`` are
applied per batch, which gives bit-identical tensors. The file name is a hash of
the image list (paths and labels), the transform's description and the files'
content identity (``identity.content_key``: size and modification and status-change
times, taken before any image is read), so another split, preprocessing or a
changed image file (the same name, other pixels) gets another file; it is written
atomically, its blocks allocated before the map is filled (a full disk is then one error
naming the file, not a SIGBUS). Files of earlier contents stay in the folder until deleted.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from lora_zoo.files import atomic_write, reserve
from lora_zoo.host import available_cpus

from .base import DatasetError, Datum, load_image
from .identity import content_key

RGB_BYTES_PER_PIXEL = 4  # Pillow stores an RGB pixel in 32 bits


class DecodedImages:
    """``get(index)`` → the decoded image of ``data[index]``, or None when it was past the memory bound."""

    def __init__(self, data: Sequence[Datum], limit_mb: float, threads: Optional[int] = None):
        self.images: dict[int, object] = {}
        self.bytes = 0
        limit = limit_mb * 2 ** 20
        if limit <= 0:
            return
        with ThreadPoolExecutor(max_workers=threads or min(8, available_cpus())) as pool:
            for index, image in enumerate(pool.map(lambda d: load_image(d.impath), data)):
                size = image.width * image.height * RGB_BYTES_PER_PIXEL
                if self.bytes + size > limit:
                    break
                self.images[index] = image
                self.bytes += size

    def get(self, index: int):
        return self.images.get(index)

    def __len__(self) -> int:
        return len(self.images)


def split_transform(transform) -> Optional[tuple[T.Compose, T.Normalize]]:
    """``(geometry, normalize)`` of a ``Compose(..., ToTensor(), Normalize(...))``; None for other transforms."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    return T.Compose(steps[:-2]), steps[-1]


class PreprocessedImages:
    """Batches of ``data`` transformed by ``transform``, read from a memory-mapped uint8 cache in ``folder``."""

    def __init__(self, data: Sequence[Datum], transform, folder, batch_size: int):
        parts = split_transform(transform)
        if parts is None:
            raise DatasetError(f"cannot cache images preprocessed by {type(transform).__name__}: expected a "
                               "torchvision Compose ending in ToTensor() and Normalize()")
        self.geometry, self.normalize = parts
        self.data, self.batch_size = list(data), batch_size
        listing = "\n".join(f"{d.impath}|{d.label}" for d in self.data) + "\n" + repr(transform)
        listing += "\n" + content_key(self.data)  # before any pixel is read: a file changed meanwhile gets a new key
        self.path = Path(folder) / f"images-{hashlib.sha1(listing.encode()).hexdigest()[:20]}.npy"
        if not self.path.is_file():
            self._write()
        self.array = np.load(self.path, mmap_mode="r")

    def _pixels(self, item: Datum) -> np.ndarray:
        return np.asarray(self.geometry(load_image(item.impath)), dtype=np.uint8).transpose(2, 0, 1)

    def _write(self) -> None:
        first = self._pixels(self.data[0])

        def write(tmp):
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(self.data), *first.shape))
            reserve(tmp)  # a full disk: ENOSPC now, not a SIGBUS when a page of the map is written
            with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
                for index, pixels in enumerate(pool.map(self._pixels, self.data)):
                    if pixels.shape != first.shape:
                        raise DatasetError(f"{self.data[index].impath} preprocesses to {pixels.shape}, "
                                           f"the first test image to {first.shape}")
                    array[index] = pixels
            array.flush()
            del array

        atomic_write(self.path, write)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels = torch.tensor([d.label for d in self.data])
        for start in range(0, len(self.data), self.batch_size):
            pixels = torch.from_numpy(np.array(self.array[start:start + self.batch_size]))
            images = F.normalize(pixels.to(torch.float32).div(255), self.normalize.mean, self.normalize.std)
            yield images, labels[start:start + self.batch_size]
