"""Augmentation on the training device: the PIL path's crop boxes, flips, batch order and labels; its pixels
within two levels of 255; the memory budget; the global RNG untouched; clean errors; the benchmark runs."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from datasets import DatasetError, build_test_transform, build_train_transform
from datasets.base import Datum
from datasets.cache import DecodedImages
from datasets.device_augment import (CropAndFlip, DeviceAugmentation, DeviceImages, DeviceTrainStream, augment_batch,
                                     draw_batch, resize_like_pillow, vertical_first)
from datasets.loader import AugmentedImages, TrainStream
from datasets.textures import class_list, render_texture

REPO = Path(__file__).resolve().parents[1]
STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip's OpenAI std, the default of build_train_transform
LEVEL = 1 / 255 / min(STD)  # one level of 255 after normalisation
# (height, width) of the test JPEGs: square, tall, wide, and smaller than the crop size
SIZES = [(64, 64), (80, 48), (40, 72), (24, 30), (96, 60), (50, 50), (33, 90), (70, 20)]


def write_images(folder: Path, sizes, seed: int = 0) -> list[Datum]:
    data = []
    for index, (height, width) in enumerate(sizes):
        colour, pattern = class_list(48)[(5 * index) % 48]
        side = max(height, width)
        pixels = render_texture(colour, pattern, side, np.random.default_rng([seed, index]))[:height, :width]
        path = folder / f"image_{index}.jpg"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=92)
        data.append(Datum(str(path), index % 3, f"class {index % 3}"))
    return data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("small"), SIZES)


class Recorder:
    """The crop boxes and flips the PIL path's own transform draws (torchvision's code, only observed)."""

    def __init__(self, transform, monkeypatch):
        self.boxes, self.flips = [], []
        crop, flip = transform.transforms[:2]
        get_params = crop.get_params

        def record_box(img, scale, ratio):
            box = get_params(img, scale, ratio)
            self.boxes.append(tuple(box))
            return box

        forward = type(flip).forward

        def record_flip(img):
            out = forward(flip, img)
            self.flips.append(out is not img)
            return out

        monkeypatch.setattr(crop, "get_params", record_box)
        monkeypatch.setattr(flip, "forward", record_flip)


def test_draws_are_the_pil_paths_for_every_seed_epoch_and_sample(small, monkeypatch):
    transform = build_train_transform({"size": 32})
    augmentation = DeviceAugmentation.from_transform(build_train_transform({"size": 32}))  # not the observed one
    images = DeviceImages(small, "cpu", 0)
    assert [tuple(images[i].shape) for i in range(len(small))] == [(3, h, w) for h, w in SIZES]
    recorder = Recorder(transform, monkeypatch)
    keys = [(epoch, index) for epoch in (0, 1, 5, 123) for index in range(len(small))]
    draws = []
    for seed in (0, 1, 7, 2 ** 32 - 1):
        pil = AugmentedImages(small, transform, seed)
        for key in keys:
            pil[key]
        draws += draw_batch(augmentation, images, seed, keys)
    assert len(draws) == len(recorder.boxes) == 4 * 4 * len(SIZES)
    assert [tuple(d[:4]) for d in draws] == recorder.boxes and [d.flip for d in draws] == recorder.flips
    assert 0.3 < np.mean(recorder.flips) < 0.7 and len(set(recorder.boxes)) > 0.9 * len(draws)  # real draws
    for (top, left, height, width), (_, index) in zip(recorder.boxes, keys * 4):
        assert 0 <= top <= SIZES[index][0] - height and 0 <= left <= SIZES[index][1] - width


def test_stream_gives_the_train_streams_batches_and_resumes_anywhere(small):
    transform = build_train_transform({"size": 40})
    reference = TrainStream(small, transform, batch_size=3, seed=5, num_workers=0)
    expected = [next(it) for it in [iter(reference)] for _ in range(7)]  # 3 batches an epoch: crosses 2 epochs
    stream = DeviceTrainStream(small, transform, 3, seed=5, device="cpu")
    ours = [next(it) for it in [iter(stream)] for _ in range(7)]
    for (pil_images, pil_labels), (images, labels) in zip(expected, ours):
        assert torch.equal(labels, pil_labels) and labels.dtype == torch.long
        assert images.shape == pil_images.shape and images.dtype == torch.float32
        assert (images - pil_images).abs().max() <= 2 * LEVEL + 1e-6
    resumed = DeviceTrainStream(small, transform, 3, seed=5, device="cpu", start_step=4, images=stream.images)
    for (a, la), (b, lb) in zip(ours[4:], [next(it) for it in [iter(resumed)] for _ in range(3)]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other = next(iter(DeviceTrainStream(small, transform, 3, seed=6, device="cpu", images=stream.images)))
    assert not torch.equal(other[0], ours[0][0])


def test_pixels_are_within_two_levels_of_the_pil_path_on_512px_jpegs(tmp_path):
    sizes = [(512, 512), (512, 384), (384, 512), (512, 300)]
    data = write_images(tmp_path, sizes, seed=3)
    transform = build_train_transform({"size": 224})
    decoded = DecodedImages(data, 64)
    images = DeviceImages(data, "cpu", 0, decoded=decoded)
    keys = [(epoch, index) for epoch in range(12) for index in range(len(data))]
    pil = AugmentedImages(data, transform, seed=1, images=decoded)
    expected = torch.stack([pil[key][0] for key in keys])
    augmentation = DeviceAugmentation.from_transform(transform)
    draws = draw_batch(augmentation, images, 1, keys)
    for uint8 in (True, False):
        ours = augment_batch(augmentation, [images[i] for _, i in keys], draws, "cpu", uint8_kernels=uint8)
        difference = (ours - expected).abs()
        # measured: max two levels, mean 3e-5 (uint8) / 2e-6 (float); a wrong filter, antialias or pass order
        # is off by ~10 levels on some pixels and 1e-3 on average
        assert difference.max() <= 2 * LEVEL + 1e-6
        assert difference.mean() < 1e-4 and (difference == 0).float().mean() > 0.995


@pytest.mark.parametrize("uint8", [True, False])
def test_resize_takes_pillows_pass_order(uint8):
    generator = np.random.default_rng(0)
    source = Image.fromarray((generator.random((300, 300, 3)) * 255).astype(np.uint8))  # noise: every level counts
    for height, width in [(269, 235), (300, 120), (240, 300), (100, 150), (230, 30), (224, 224), (224, 80)]:
        crop = source.crop((0, 0, width, height))
        expected = torch.from_numpy(np.array(crop.resize((224, 224), Image.BICUBIC))).permute(2, 0, 1).float()
        pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).unsqueeze(0)
        ours = resize_like_pillow(pixels, (224, 224), "bicubic", uint8)[0].float()
        assert (ours - expected).abs().max() <= 2, (height, width)  # the other order: up to 21 levels here
    assert vertical_first(269, 235, 224, 224) and not vertical_first(300, 300, 224, 224)
    assert not vertical_first(100, 20, 224, 224)  # Pillow goes horizontal first when the height grows


def test_flip_mirrors_and_a_crop_of_the_output_size_is_untouched(small):
    transform = build_train_transform({"size": 24})
    augmentation = DeviceAugmentation.from_transform(transform)
    image = DeviceImages(small, "cpu", 0)[3]  # 24 x 30
    draws = [CropAndFlip(0, 3, 24, 24, False), CropAndFlip(0, 3, 24, 24, True)]
    for uint8 in (True, False):
        plain, flipped = augment_batch(augmentation, [image, image], draws, "cpu", uint8)
        assert torch.equal(flipped, plain.flip(-1))
        expected = TF.normalize(image[:, :, 3:27].float() / 255, augmentation.mean, augmentation.std)
        assert torch.equal(plain, expected)


def test_device_budget_keeps_images_in_order_and_the_rest_in_host_memory(small):
    pixels = [3 * h * w for h, w in SIZES]
    limit = sum(pixels[:3]) + pixels[3] // 2  # room for the first three
    images = DeviceImages(small, "meta", limit / 2 ** 20)  # a device without storage: placement only
    assert images.on_device == 3 and images.device_bytes == sum(pixels[:3])
    assert images.host_bytes == sum(pixels[3:])
    assert [images[i].device.type for i in range(len(small))] == ["meta"] * 3 + ["cpu"] * (len(SIZES) - 3)
    host = DeviceImages(small, "cpu", 0)
    for index in range(3, len(SIZES)):
        assert torch.equal(images[index], host[index])  # the host copies are the decoded pixels
    assert DeviceImages(small, "meta", 0).on_device == 0
    assert DeviceImages(small, "cpu", 0).on_device == len(SIZES)  # on the CPU every image is where the device is


def test_stream_leaves_the_global_generator_alone(small):
    transform = build_train_transform({"size": 16})
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    next(iter(DeviceTrainStream(small, transform, 4, seed=3, device="cpu")))
    assert torch.equal(torch.rand(4), expected)


def test_bad_inputs_are_one_line_errors(small, tmp_path):
    with pytest.raises(DatasetError, match="cannot augment on the device with Compose") as error:
        DeviceAugmentation.from_transform(build_test_transform({"size": 32}))
    assert "\n" not in str(error.value)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        DeviceImages(small[:2] + [Datum(str(broken), 0, "x")], "cpu", 0)
    with pytest.raises(DatasetError, match="batch_size must be >= 1"):
        DeviceTrainStream(small, build_train_transform({"size": 16}), 0, seed=1, device="cpu")
    with pytest.raises(DatasetError, match="empty"):
        DeviceTrainStream([], build_train_transform({"size": 16}), 2, seed=1, device="cpu")


def test_benchmark_reports_identical_draws_and_both_speeds(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_augment", REPO / "scripts" / "bench_augment.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.run(images=8, size=64, batch=4, count=2, reps=1, seed=1, root=tmp_path, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert result["draws"] == 8 and result["boxes_identical"] and result["flips_identical"]
    assert result["labels_identical"] and result["uint8_max_abs"] <= 2 * LEVEL + 1e-6
    assert set(result["images_per_s"]) == {"pil", "device_uint8", "device_float"}
    assert all(value > 0 for value in result["images_per_s"].values())
    table = bench.markdown(result)
    assert "| PIL path" in table and "crop boxes identical: True" in table
