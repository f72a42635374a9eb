"""Data that is not what it was, or not what it seems: caches keyed on file content, 16-bit images, sizes the
synthetic layouts cannot hold, class folders that name one class twice.

Real files throughout: JPEGs from ``datasets.synthetic``, 16-bit PNG/TIFF/PGM files written with Pillow and numpy
(and a 16-bit RGB PNG written chunk by chunk, which Pillow cannot write).
"""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from datasets import build_dataset, check, synthetic
from datasets.base import DatasetError, Datum, load_image
from datasets.cache import PreprocessedImages
from datasets.identity import content_key
from datasets.imagefolder import SPLIT_FILE


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ---- caches keyed on content --------------------------------------------------------------------------------
def test_content_key_sees_a_swap_that_keeps_sizes_and_modification_times(tmp_path):
    # two BMPs of one size and one mtime: only the status-change time (set by the rename) tells them apart
    for name, value in (("a.bmp", 10), ("b.bmp", 200)):
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / name)
        os.utime(tmp_path / name, ns=(1_600_000_000_000_000_000,) * 2)
    data = [Datum(str(tmp_path / "a.bmp"), 0, "a"), Datum(str(tmp_path / "b.bmp"), 1, "b")]
    assert os.path.getsize(data[0].impath) == os.path.getsize(data[1].impath)
    before = content_key(data)
    assert content_key(data) == before and len(before) == 40  # stable while nothing changes
    os.rename(tmp_path / "a.bmp", tmp_path / "t.bmp")
    os.rename(tmp_path / "b.bmp", tmp_path / "a.bmp")
    os.rename(tmp_path / "t.bmp", tmp_path / "b.bmp")
    assert [os.stat(d.impath).st_mtime_ns for d in data] == [1_600_000_000_000_000_000] * 2
    assert content_key(data) != before
    assert content_key([data[0], Datum(data[1].impath, 2, "b")]) != content_key(data)  # labels count too
    with pytest.raises(DatasetError, match="image file not found: .*missing.jpg"):
        content_key([Datum(str(tmp_path / "missing.jpg"), 0, "a")])


def test_preprocessed_test_cache_is_rebuilt_for_swapped_images_and_reused_otherwise(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path / "data", "dtd", num_classes=2, train_per_class=1, val_per_class=0,
                                      test_per_class=2, image_size=24)
    test = build_dataset("dtd", tmp_path / "data", shots=1).test
    transform = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    folder = tmp_path / "cache"

    def pixels(datum):  # what the cache must hold for one image: its decoded, resized uint8 pixels
        return np.asarray(transform.transforms[1](transform.transforms[0](load_image(datum.impath)))).transpose(2, 0, 1)

    first = PreprocessedImages(test, transform, folder, batch_size=4)
    written = os.stat(first.path)
    assert [np.array_equal(first.array[i], pixels(d)) for i, d in enumerate(test)] == [True] * 4
    again = PreprocessedImages(test, transform, folder, batch_size=4)
    assert again.path == first.path and os.stat(again.path).st_mtime_ns == written.st_mtime_ns  # reused, not rewritten
    assert os.stat(again.path).st_ino == written.st_ino and len(list(folder.glob("*.npy"))) == 1

    a, b = test[0].impath, test[-1].impath  # one image of each class swapped, names kept
    assert test[0].label != test[-1].label
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    swapped = PreprocessedImages(test, transform, folder, batch_size=4)
    assert swapped.path != first.path and len(list(folder.glob("*.npy"))) == 2
    assert np.array_equal(swapped.array[0], first.array[3]) and np.array_equal(swapped.array[3], first.array[0])
    assert not np.array_equal(swapped.array[0], first.array[0])
    assert [np.array_equal(swapped.array[i], pixels(d)) for i, d in enumerate(test)] == [True] * 4
    images, labels = next(iter(swapped))
    expected = (np.stack([pixels(d) for d in test]).astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(images.numpy(), expected, rtol=0, atol=1e-6)
    assert labels.tolist() == [d.label for d in test]


# ---- 16-bit and other high-bit-depth images --------------------------------------------------------------------
def png16(path, array):
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis) written chunk by chunk (Pillow cannot)."""
    a = np.asarray(array, dtype=">u2")
    a = a[..., None] if a.ndim == 2 else a
    height, width, channels = a.shape
    rows = b"".join(b"\x00" + a[row].tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


GRADIENT16 = np.tile(np.linspace(0, 65535, 300).round().astype(np.uint16), (4, 1))  # not multiples of 257
GRADIENT8 = np.round(GRADIENT16 / 257).astype(np.uint8)  # the same picture saved with 8 bits


@pytest.mark.parametrize("kind", ["png I;16", "tiff I;16B", "pgm 16-bit", "png rgb16"])
def test_16_bit_images_decode_to_their_8_bit_gradient(kind, tmp_path):
    path = tmp_path / f"image.{kind.split()[0]}"
    if kind == "png I;16":
        Image.fromarray(GRADIENT16).save(path)
    elif kind == "tiff I;16B":
        Image.fromarray(GRADIENT16.astype(">u2")).save(path)
    elif kind == "pgm 16-bit":
        path.write_bytes(b"P5\n300 4\n65535\n" + GRADIENT16.astype(">u2").tobytes())
    else:
        png16(path, np.stack([GRADIENT16, 65535 - GRADIENT16, GRADIENT16 // 2], axis=-1))
    with Image.open(path) as opened:
        mode = opened.mode
    assert mode == {"png I;16": "I;16", "tiff I;16B": "I;16B", "pgm 16-bit": "I", "png rgb16": "RGB"}[kind]
    Image.fromarray(GRADIENT8).save(tmp_path / "eight.png")
    decoded = np.asarray(load_image(str(path))).astype(int)
    reference = np.asarray(load_image(str(tmp_path / "eight.png"))).astype(int)
    if kind == "png rgb16":
        reference = np.stack([GRADIENT8, 255 - GRADIENT8, np.round(GRADIENT16 // 2 / 257)], axis=-1).astype(int)
    assert decoded.shape == (4, 300, 3) and decoded.min() == 0 and decoded[..., 0].max() == 255  # full range
    assert np.abs(decoded - reference).max() <= 1


def test_images_without_an_8_bit_range_are_refused_by_name(tmp_path):
    Image.fromarray(GRADIENT16.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    Image.fromarray(GRADIENT16.astype(np.int32) * 1000).save(tmp_path / "int32.tif")
    with pytest.raises(DatasetError) as err:
        load_image(str(tmp_path / "float.tif"))
    assert str(err.value) == (f"cannot decode image {tmp_path / 'float.tif'}: mode F (floating-point samples, TIFF) "
                              "has no defined 8-bit range; save it with 8 or 16 bits per sample")
    with pytest.raises(DatasetError, match=r"int32.tif: mode I \(32-bit integer samples, TIFF\) has no defined"):
        load_image(str(tmp_path / "int32.tif"))


def test_check_decode_flags_what_it_cannot_read_right_and_passes_16_bit(tmp_path):
    for index in range(4):
        (tmp_path / "grey").mkdir(exist_ok=True)
        Image.fromarray(GRADIENT16 // (index + 1)).save(tmp_path / "grey" / f"{index}.png")
        (tmp_path / "colour").mkdir(exist_ok=True)
        png16(tmp_path / "colour" / f"{index}.png", np.stack([GRADIENT16] * 3, axis=-1))
    Image.fromarray(GRADIENT16.astype(np.float32)).save(tmp_path / "grey" / "depth.tif")
    report = io.StringIO()
    problems = check.check_dataset("imagefolder", str(tmp_path), decode=True, out=report)
    assert len(problems) == 1 and problems[0].startswith(
        f"cannot decode image {tmp_path / 'grey' / 'depth.tif'}: mode F (floating-point samples, TIFF)")
    assert "PROBLEMS: 1" in report.getvalue()
    assert check.main(["--root_path", str(tmp_path), "--dataset", "imagefolder", "--decode"]) == 1
    (tmp_path / "grey" / "depth.tif").unlink()
    assert check.check_dataset("imagefolder", str(tmp_path), decode=True, out=io.StringIO()) == []
    assert check.main(["--root_path", str(tmp_path), "--dataset", "imagefolder", "--decode"]) == 0
    assert not (tmp_path / SPLIT_FILE).exists()


# ---- the synthetic generator refuses sizes its layouts cannot hold --------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--num_classes", "0"], "num_classes must be 1..47 (dtd has 47 classes), got 0"),
    (["--num_classes", "500"], "num_classes must be 1..47 (dtd has 47 classes), got 500"),
    (["--dataset", "imagefolder", "--num_classes", "1001"], "num_classes must be 1..1000 (at most 1000 classes)"),
    (["--image_size", "0"], "image_size must be 1..65500 pixels (JPEG's limit), got 0"),
    (["--train_per_class", "-3"], "train_per_class must be >= 1, got -3"),
    (["--val_per_class", "-1"], "val_per_class must be >= 0, got -1"),
    (["--test_per_class", "0"], "test_per_class must be >= 1, got 0"),
    (["--dataset", "imagefolder", "--train_per_class", "1", "--val_per_class", "0", "--test_per_class", "2"],
     "imagefolder needs at least 4 images per class (its reader splits each class 50/20/30), got 3"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
])
def test_synthetic_refuses_impossible_sizes_and_writes_nothing(args, message, tmp_path, capsys):
    root = tmp_path / "root"
    assert synthetic.main(["--root", str(root), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not root.exists()


def test_synthetic_accepts_the_bounds(tmp_path, capsys):
    assert synthetic.main(["--root", str(tmp_path), "--num_classes", "47", "--train_per_class", "1",
                           "--val_per_class", "0", "--test_per_class", "1", "--image_size", "1"]) == 0
    dataset = build_dataset("dtd", tmp_path, shots=1)
    assert dataset.num_classes == 47 and len(set(dataset.classnames)) == 47 and len(dataset.test) == 47
    assert load_image(dataset.test[0].impath).size == (1, 1)


# ---- imagefolder: two folders, one class ------------------------------------------------------------------------
def test_imagefolder_refuses_two_folders_of_one_class_and_writes_no_split(tmp_path):
    for folder in ("blue jay", "blue_jay", "robin"):
        (tmp_path / folder).mkdir()
        for index in range(4):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / folder / f"{index}.jpg")
    with pytest.raises(DatasetError) as err:
        build_dataset("imagefolder", tmp_path, shots=1)
    assert str(err.value) == (f"class folders 'blue jay' and 'blue_jay' in {tmp_path} both name the class 'blue jay' "
                              "(an underscore reads as a space); rename or merge one")
    assert not (tmp_path / SPLIT_FILE).exists()
    (tmp_path / "blue_jay").rename(tmp_path / "blue_jay_juvenile")
    assert build_dataset("imagefolder", tmp_path, shots=1).classnames == ["blue jay", "blue jay juvenile", "robin"]
