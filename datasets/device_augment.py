"""Few-shot training augmentation on the training device: the CLIP-LoRA crop, flip and normalisation in batches.

The train stream of ``loader.TrainStream`` decodes each image once (``cache.DecodedImages``) and runs
torchvision's RandomResizedCrop (scale 0.08-1, bicubic) + RandomHorizontalFlip + ToTensor + Normalize
on PIL images, one sample at a time (Zanella & Ben Ayed, CVPRW 2024, train transform). On a GPU that
costs CPU workers more than the model's step. ``DeviceTrainStream`` gives the same batches from the
same decoded pixels with the pixel work done where the model runs:

- ``DeviceImages``: the decoded few-shot set as uint8 ``(3, H, W)`` tensors (sizes differ), on the
  training device up to ``limit_mb`` and in host memory past it (pinned with CUDA; copied per use);
- ``draw_crop_and_flip``: the crop box ``(i, j, h, w)`` and the flip are the draws torchvision makes
  (``RandomResizedCrop.get_params``, then ``torch.rand(1) < p``) under the CPU generator seeded from
  ``(seed, epoch, index)`` (``loader.seed_augmentation``), on the CPU: a run sees the same crops
  whichever path processes its pixels (identical boxes, tested);
- ``resize_like_pillow``: the crop resampled as Pillow does (antialiased bicubic with a = -0.5, two
  separable passes, each rounded and clipped to 0..255), in the order Pillow 13 takes: vertical first
  when it shrinks the height by more than twice as many pixels as the width, else horizontal first
  (measured: on 600 random sizes this rule told which order reproduces Pillow 13's output every time;
  Pillow <= 12.3 always went horizontal first, which changes a few pixels by up to ~10 levels).
  On the CPU the passes run on uint8 (torch's Pillow-style fixed-point kernels); elsewhere in float,
  rounded after each pass (torch's uint8 bicubic kernels are CPU-only);
- the flip, ``/255`` and the model's mean/std per batch, in place.

No step syncs with the host per sample: draws are Python numbers, crops are slices, copies from pinned
memory are non-blocking.

Pixels against the PIL path, after normalisation (``scripts/bench_augment.py --batches 64 --reps 1``:
2,048 crops of 64 synthetic 512-px JPEGs): uint8 kernels max |diff| 0.030 (two levels of 255), mean
3.3e-5, 99.77% of values identical; float kernels max 0.029, mean 1.7e-6, 99.988% identical. Speed
per core on the CPU (same script, 8 x 32 crops, 5 repetitions): 993 images/s against the PIL path's 311.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from lora_zoo.host import available_cpus

from .base import DatasetError, Datum, load_image
from .loader import EpochBatches, seed_augmentation

MODES = {T.InterpolationMode.BICUBIC: "bicubic", T.InterpolationMode.BILINEAR: "bilinear"}


class CropAndFlip(NamedTuple):
    """One sample's draws: the crop box (top, left, height, width) in the decoded image, and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class DeviceAugmentation:
    """The train transform's steps, read from ``transforms.build_train_transform``'s Compose."""

    crop: T.RandomResizedCrop
    flip: T.RandomHorizontalFlip
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform) -> "DeviceAugmentation":
        steps = list(getattr(transform, "transforms", []))
        kinds = (T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize)
        if len(steps) != 4 or not all(isinstance(step, kind) for step, kind in zip(steps, kinds)) \
                or steps[0].interpolation not in MODES:
            raise DatasetError(f"cannot augment on the device with {' '.join(repr(transform).split())}: expected "
                               "Compose(RandomResizedCrop (bicubic or bilinear), RandomHorizontalFlip, ToTensor, "
                               "Normalize), as transforms.build_train_transform makes it")
        return cls(steps[0], steps[1], tuple(float(v) for v in steps[3].mean), tuple(float(v) for v in steps[3].std))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.crop.size[0]), int(self.crop.size[1])

    @property
    def mode(self) -> str:
        return MODES[self.crop.interpolation]


def draw_crop_and_flip(augmentation: DeviceAugmentation, image: torch.Tensor) -> CropAndFlip:
    """The draws the PIL path makes for ``image`` (only its shape is read) from the current CPU generator."""
    top, left, height, width = augmentation.crop.get_params(image, augmentation.crop.scale, augmentation.crop.ratio)
    return CropAndFlip(top, left, height, width, bool(torch.rand(1) < augmentation.flip.p))


def draw_batch(augmentation: DeviceAugmentation, images: Sequence[torch.Tensor], seed: int,
               keys: Sequence[tuple[int, int]]) -> list[CropAndFlip]:
    """``draw_crop_and_flip`` for each ``(epoch, index)`` key, seeded as the PIL path seeds it; the caller's
    CPU generator state is restored afterwards."""
    draws = []
    with torch.random.fork_rng(devices=[]):
        for epoch, index in keys:
            seed_augmentation(seed, epoch, index)
            draws.append(draw_crop_and_flip(augmentation, images[index]))
    return draws


@lru_cache(maxsize=None)
def _pillow_major() -> int:
    from PIL import __version__ as version

    return int(version.split(".")[0])


def vertical_first(in_height: int, in_width: int, out_height: int, out_width: int) -> bool:
    """Whether the installed Pillow resamples the vertical axis first: Pillow 13 does when the height shrinks by
    more than twice as many pixels as the width (see the module docstring); Pillow 12 and older never do."""
    if _pillow_major() < 13:
        return False
    return in_height > out_height and 2 * (in_width - out_width) < in_height - out_height


def resize_like_pillow(crop: torch.Tensor, size: tuple[int, int], mode: str = "bicubic",
                       uint8_kernels: bool = True) -> torch.Tensor:
    """``crop`` (uint8, ``(1, C, h, w)``) resampled to ``size`` as Pillow's ``resize`` does: two antialiased
    passes, each rounded and clipped to 0..255. Returns uint8 with ``uint8_kernels``, else float of
    whole numbers."""
    height, width = crop.shape[-2:]
    out_height, out_width = size
    passes = [(out_height, width), size] if vertical_first(height, width, out_height, out_width) \
        else [(height, out_width), size]
    if uint8_kernels:
        image = crop.contiguous(memory_format=torch.channels_last)  # the layout torch's fast uint8 kernels take
    else:
        image = crop.float()
    for shape in passes:
        if tuple(image.shape[-2:]) == shape:
            continue  # Pillow skips a pass that keeps its axis
        image = F.interpolate(image, size=shape, mode=mode, antialias=True, align_corners=False)
        if not uint8_kernels:
            image = image.clamp_(0, 255).round_()
    return image


def augment_batch(augmentation: DeviceAugmentation, images: Sequence[torch.Tensor], draws: Sequence[CropAndFlip],
                  device: torch.device, uint8_kernels: Optional[bool] = None) -> torch.Tensor:
    """The normalised ``(B, 3, H, W)`` float batch of ``images[k]`` cropped, resized and flipped by ``draws[k]``,
    on ``device``. ``uint8_kernels=None``: uint8 resampling on the CPU, float elsewhere."""
    device = torch.device(device)
    uint8_kernels = device.type == "cpu" if uint8_kernels is None else uint8_kernels
    height, width = augmentation.size
    batch = torch.empty((len(draws), 3, height, width), device=device,
                        dtype=torch.uint8 if uint8_kernels else torch.float32)
    for slot, (image, draw) in enumerate(zip(images, draws)):
        image = image.to(device, non_blocking=True)
        crop = image[:, draw.top:draw.top + draw.height, draw.left:draw.left + draw.width].unsqueeze(0)
        resized = resize_like_pillow(crop, (height, width), augmentation.mode, uint8_kernels)[0]
        batch[slot] = resized.flip(-1) if draw.flip else resized
    mean, std = _statistics(augmentation.mean, augmentation.std, device)
    return batch.float().div_(255).sub_(mean).div_(std)  # ToTensor's /255, then Normalize, as torchvision does


@lru_cache(maxsize=8)
def _statistics(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize's mean and std as ``(C, 1, 1)`` float32 tensors on ``device``, made once."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for v in (mean, std))


def _pixels(image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB array of a PIL image."""
    return np.array(image, dtype=np.uint8).reshape(image.height, image.width, 3)


def _pack(arrays: Sequence[np.ndarray], pin: bool) -> list[torch.Tensor]:
    """The arrays copied into one host buffer (pinned with ``pin``), as ``(3, H, W)`` views of it."""
    buffer = torch.empty(sum(a.nbytes for a in arrays), dtype=torch.uint8, pin_memory=pin)
    views, offset = [], 0
    for array in arrays:
        part = buffer[offset:offset + array.nbytes]
        part.numpy()[:] = array.reshape(-1)
        views.append(part.view(array.shape).permute(2, 0, 1))
        offset += array.nbytes
    return views


class DeviceImages:
    """``images[index]``: the decoded ``data[index]`` as a uint8 ``(3, H, W)`` tensor (HWC in memory).

    In order, images go to ``device`` while they fit in ``limit_mb`` (3 bytes a pixel); the rest stay in
    host memory, pinned when ``device`` is CUDA (``augment_batch`` copies them without blocking). On the
    CPU every image is in host memory, where the device is. ``decoded`` (a ``cache.DecodedImages``)
    supplies the images it holds, so nothing is decoded twice.
    """

    def __init__(self, data: Sequence[Datum], device, limit_mb: float, decoded=None, threads: Optional[int] = None):
        self.device = torch.device(device)
        self.device_bytes = self.host_bytes = 0
        limit = max(0.0, limit_mb) * 2 ** 20
        cpu = self.device.type == "cpu"

        def decode(index: int) -> np.ndarray:
            image = decoded.get(index) if decoded is not None else None
            return _pixels(image if image is not None else load_image(data[index].impath))

        self.images: list[Optional[torch.Tensor]] = [None] * len(data)
        host: dict[int, np.ndarray] = {}
        with ThreadPoolExecutor(max_workers=threads or min(8, available_cpus())) as pool:
            for index, pixels in enumerate(pool.map(decode, range(len(data)))):
                if cpu or (not host and self.device_bytes + pixels.nbytes <= limit):
                    self.images[index] = torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)
                    self.device_bytes += pixels.nbytes
                else:
                    host[index] = pixels
                    self.host_bytes += pixels.nbytes
        for index, view in zip(host, _pack(list(host.values()), pin=self.device.type == "cuda")):
            self.images[index] = view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    @property
    def on_device(self) -> int:
        """How many images live on the device (all of them on the CPU)."""
        return sum(1 for image in self.images if image.device == self.device)


def _on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceTrainStream:
    """Endless ``(images, labels)`` training batches on ``device``: the batches ``loader.TrainStream`` gives
    (same order from ``EpochBatches``, same crops and flips, the same labels; pixels as the module docstring
    says), from ``start_step`` on. ``images``: a ``DeviceImages`` to share between streams of one run."""

    num_workers = 0  # everything runs in the training process

    def __init__(self, data: Sequence[Datum], transform, batch_size: int, seed: int, device,
                 cache_mb: float = 2048, start_step: int = 0, images: Optional[DeviceImages] = None, decoded=None,
                 uint8_kernels: Optional[bool] = None, drop_last: bool = False):
        if len(data) == 0:
            raise DatasetError("cannot train on an empty list of images")
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        self.augmentation = DeviceAugmentation.from_transform(transform)
        self.device = torch.device(device)
        self.images = images if images is not None else DeviceImages(data, self.device, cache_mb, decoded)
        if len(self.images) != len(data):
            raise DatasetError(f"the decoded images hold {len(self.images)} images, the train list {len(data)}")
        self.seed, self.uint8_kernels = seed, uint8_kernels
        self.sampler = EpochBatches(len(data), batch_size, seed, start_step, drop_last)
        self.labels = torch.tensor([d.label for d in data], dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for keys in self.sampler:
            indices = [index for _, index in keys]
            draws = draw_batch(self.augmentation, self.images, self.seed, keys)
            images = augment_batch(self.augmentation, [self.images[i] for i in indices], draws, self.device,
                                   self.uint8_kernels)
            yield images, _on_device(self.labels[indices], self.device)
