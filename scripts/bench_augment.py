"""Training augmentation per core: the device path (``datasets.device_augment``) on CPU tensors against the PIL path.

Both paths start from the same decoded few-shot images (synthetic 512-px JPEGs in Food-101's layout,
written by ``datasets.synthetic``) and give the same batches: ``loader.TrainStream`` with no workers
and the decoded cache (torchvision's RandomResizedCrop(224, scale 0.08-1, bicubic) + flip + ToTensor
+ Normalize on PIL images, per sample) against ``DeviceTrainStream`` on the CPU (uint8 resampling),
and the device path with float resampling (the arithmetic it uses on CUDA). Measured side by side in
one process at one intra-op thread (images/s per core; paths interleaved in every repetition, median
reported). Checked on the same batches: crop boxes and flips (recorded from the PIL path's own
transform) equal the device path's draws, labels equal, and how far the pixels are after normalisation.

    python scripts/bench_augment.py                  # 64 images, 8 batches of 32, 5 repetitions
    python scripts/bench_augment.py --quick          # seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import build_dataset, write_synthetic_dataset  # noqa: E402
from datasets.cache import DecodedImages  # noqa: E402
from datasets.device_augment import DeviceImages, DeviceTrainStream, draw_batch  # noqa: E402
from datasets.loader import TrainStream  # noqa: E402
from datasets.transforms import build_train_transform  # noqa: E402

CLASSES = 8


class RecordingCrop(T.RandomResizedCrop):
    """RandomResizedCrop that also records the boxes it draws (the draws themselves are unchanged)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.boxes: list[tuple[int, int, int, int]] = []

    def get_params(self, img, scale, ratio):
        box = super().get_params(img, scale, ratio)
        self.boxes.append(tuple(box))
        return box


class RecordingFlip(T.RandomHorizontalFlip):
    """RandomHorizontalFlip that also records whether it flipped (it returns its input when it does not)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flips: list[bool] = []

    def forward(self, img):
        out = super().forward(img)
        self.flips.append(out is not img)
        return out


def recording_transform(transform: T.Compose) -> T.Compose:
    crop, flip, to_tensor, normalize = transform.transforms
    return T.Compose([RecordingCrop(crop.size, crop.scale, crop.ratio, crop.interpolation, crop.antialias),
                      RecordingFlip(flip.p), to_tensor, normalize])


def batches(stream, count: int) -> list:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def check_identity(data, transform, decoded, device_images, batch: int, count: int, seed: int) -> dict:
    """Draws, labels and pixels of the first ``count`` batches of both paths."""
    recording = recording_transform(transform)
    pil = batches(TrainStream(data, recording, batch, seed, num_workers=0, images=decoded), count)
    device = DeviceTrainStream(data, transform, batch, seed, "cpu", images=device_images)
    keys = [key for keys, _ in zip(device.sampler, range(count)) for key in keys]
    draws = draw_batch(device.augmentation, device_images, seed, keys)
    result = {"draws": len(draws),
              "boxes_identical": [tuple(d[:4]) for d in draws] == recording.transforms[0].boxes,
              "flips_identical": [d.flip for d in draws] == recording.transforms[1].flips,
              "flipped": sum(d.flip for d in draws)}
    for name, uint8 in (("uint8", True), ("float", False)):
        ours = batches(DeviceTrainStream(data, transform, batch, seed, "cpu", images=device_images,
                                         uint8_kernels=uint8), count)
        result["labels_identical"] = all(torch.equal(a[1], b[1]) for a, b in zip(pil, ours))
        difference = torch.cat([(a[0] - b[0]).abs().flatten() for a, b in zip(pil, ours)])
        result[f"{name}_max_abs"] = float(difference.max())
        result[f"{name}_mean_abs"] = float(difference.mean())
        result[f"{name}_identical_fraction"] = float((difference == 0).float().mean())
    return result


def time_paths(streams: dict, count: int, reps: int, batch: int) -> dict:
    """Median images/s of each stream over ``count`` batches, streams interleaved in every repetition; each
    repetition starts where the last one stopped, so all paths see the same new crops."""
    seconds = {name: [] for name in streams}
    for rep in range(reps + 1):  # the first repetition warms up
        for name, make in streams.items():
            iterator = iter(make(rep * count))
            start = time.perf_counter()
            for _ in range(count):
                next(iterator)
            if rep:
                seconds[name].append(time.perf_counter() - start)
    return {name: count * batch / statistics.median(values) for name, values in seconds.items()}


def run(images: int, size: int, batch: int, count: int, reps: int, seed: int, root: Path, log=print) -> dict:
    torch.set_num_threads(1)
    shots = max(1, images // CLASSES)
    log(f"writing {CLASSES * shots} synthetic {size}-px JPEGs ...")
    write_synthetic_dataset(root, "food101", num_classes=CLASSES, train_per_class=shots, val_per_class=4,
                            test_per_class=1, image_size=size, seed=seed)
    data = build_dataset("food101", str(root), shots=shots, seed=seed).train_x
    transform = build_train_transform({"size": 224})
    decoded = DecodedImages(data, 1 << 20, threads=1)
    device_images = DeviceImages(data, "cpu", 0, decoded=decoded, threads=1)
    streams = {
        "pil": lambda step: TrainStream(data, transform, batch, seed, num_workers=0, start_step=step, images=decoded),
        "device_uint8": lambda step: DeviceTrainStream(data, transform, batch, seed, "cpu", start_step=step,
                                                       images=device_images),
        "device_float": lambda step: DeviceTrainStream(data, transform, batch, seed, "cpu", start_step=step,
                                                       images=device_images, uint8_kernels=False),
    }
    log("timing ...")
    per_second = time_paths(streams, count, reps, batch)
    log("checking draws and pixels ...")
    identity = check_identity(data, transform, decoded, device_images, batch, count, seed)
    return {"images": len(data), "size": size, "batch": batch, "batches": count, "reps": reps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "images_per_s": per_second,
            **identity}


def markdown(result: dict) -> str:
    r, speed = result, result["images_per_s"]
    names = {"pil": "PIL path: decoded cache + torchvision transform per sample",
             "device_uint8": "device path on CPU tensors (uint8 resampling, its CPU default)",
             "device_float": "device path on CPU tensors (float resampling, its CUDA arithmetic)"}
    lines = [f"Train augmentation, {r['images']} synthetic {r['size']}-px JPEGs, batches of {r['batch']} to 224 px, "
             f"{r['threads']} thread, median of {r['reps']} × {r['batches']} batches", "",
             "| path | images/s per core | ms per image | × PIL path |", "|---|---:|---:|---:|"]
    for key, name in names.items():
        lines.append(f"| {name} | {speed[key]:.0f} | {1000 / speed[key]:.2f} | {speed[key] / speed['pil']:.2f} |")
    lines += ["", f"Same {r['draws']} samples: crop boxes identical: {r['boxes_identical']}; flips identical: "
              f"{r['flips_identical']} ({r['flipped']} flipped); labels identical: {r['labels_identical']}.",
              "Pixels after normalisation against the PIL path: "
              + "; ".join(f"{kind} max |Δ| {r[f'{kind}_max_abs']:.4f}, mean {r[f'{kind}_mean_abs']:.1e}, identical "
                          f"{100 * r[f'{kind}_identical_fraction']:.3f}%" for kind in ("uint8", "float")) + "."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="few-shot train images (8 classes)")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic JPEGs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument("--quick", action="store_true", help="16 images of 128 px, 2 batches of 8, 1 repetition")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.batch, args.batches, args.reps = 16, 128, 8, 2, 1
    for name in ("images", "size", "batch", "batches", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.images, args.size, args.batch, args.batches, args.reps, args.seed, Path(tmp),
                     log=lambda m: print(m, file=sys.stderr))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
