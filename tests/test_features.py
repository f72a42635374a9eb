"""A head's training features, encoded once and kept on disk (lora_zoo/features.py ``cached_views``).

The entry is keyed on what the features depend on (backbone and weights, the images' content, the transform,
the seed, the precision, the device type, the encoding batch): a rerun reads it; a request for fewer views reads
its first views, for more encodes only the missing ones; an entry of another backbone or other weights, or a stale
one, is never read, even under the very file name; a read-only folder is skipped with one warning.
"""
import errno
import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_zoo.features as features
from conftest import tiny_clip
from datasets.base import Datum
from datasets.identity import content_key
from datasets.transforms import build_train_transform

CPU = torch.device("cpu")


@pytest.fixture
def images(tmp_path):
    """Six small RGB files of three classes."""
    from PIL import Image

    data = []
    for index in range(6):
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        pixels = torch.randint(0, 255, (24, 24, 3), generator=torch.Generator().manual_seed(index), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)
        data.append(Datum(str(path), index % 3, f"class {index % 3}"))
    return data


def key_of(data, transform, backbone="tiny-vit"):
    return {"backbone": backbone, "weights": None, "backbone_seed": 0, "images": content_key(data),
            "transform": repr(transform), "seed": 1, "precision": "fp32", "device": "cpu", "batch_size": 4}


def cached(model, data, views, folder, key):
    transform = build_train_transform(model)
    return features.cached_views(model, data, transform, views, 1, CPU, "fp32", 4, folder, key)


def test_a_rerun_reads_the_entry_and_views_are_a_prefix(images, tmp_path, encoded_views):
    model, folder = tiny_clip(), tmp_path / "cache"
    key = key_of(images, build_train_transform(model))
    first = cached(model, images, 3, folder, key)
    assert encoded_views == [(0, 3)] and first.features.shape == (3, 6, 32)
    assert [p.name for p in folder.iterdir()] == [features.cache_path(folder, key).name]
    again = cached(model, images, 3, folder, key)                 # a rerun: read, nothing encoded
    fewer = cached(model, images, 1, folder, key)                 # LP++'s one view from Tip-Adapter's entry
    more = cached(model, images, 5, folder, key)                  # only views 3 and 4 are encoded
    assert encoded_views == [(0, 3), (3, 5)]
    assert torch.equal(again.features, first.features) and torch.equal(fewer.features, first.features[:1])
    assert torch.equal(more.features[:3], first.features)
    fresh = features.encode_views(model, images, build_train_transform(model), 5, 1, CPU, "fp32", 4)
    torch.testing.assert_close(more.features, fresh.features, rtol=0, atol=1e-6)  # view v: the same crops always
    assert torch.equal(again.labels, torch.tensor([0, 1, 2, 0, 1, 2]))


@pytest.mark.parametrize("planted", ["another backbone's features under the same file name", "a stale key"])
def test_an_entry_of_other_weights_or_a_stale_key_is_never_read(planted, images, tmp_path, encoded_views):
    model, folder = tiny_clip(), tmp_path / "cache"
    key = key_of(images, build_train_transform(model))
    path = features.cache_path(folder, key)
    folder.mkdir()
    if planted.startswith("another"):  # other weights (tiny-clip, width 64) written where this key's entry goes
        stored = {"format": features.CACHE_FORMAT, **key_of(images, build_train_transform(model), "tiny-clip")}
        wrong = torch.full((3, 6, 64), 7.0)
    else:  # this setting's key before an image changed: the right shape, the wrong numbers
        stored = {"format": features.CACHE_FORMAT, **key, "images": "0" * 40}
        wrong = torch.full((3, 6, 32), 7.0)
    save_file({"features": wrong, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}, str(path),
              metadata={"key": json.dumps(stored, sort_keys=True)})
    support = cached(model, images, 3, folder, key)
    assert encoded_views == [(0, 3)]                    # encoded, not read
    assert support.features.shape == (3, 6, 32) and not (support.features == 7.0).any()
    assert torch.equal(features.read_cached(path, key, support.labels), support.features)  # replaced


def test_a_changed_image_is_another_entry(images, tmp_path, encoded_views):
    model, folder = tiny_clip(), tmp_path / "cache"
    first = cached(model, images, 2, folder, key_of(images, build_train_transform(model)))
    os.utime(images[0].impath, ns=(1, 1))         # the same name, another modification time: maybe other pixels
    second = cached(model, images, 2, folder, key_of(images, build_train_transform(model)))
    assert encoded_views == [(0, 2), (0, 2)] and len(list(folder.iterdir())) == 2
    assert torch.equal(first.features, second.features)  # (the pixels did not change here)


def test_a_read_only_folder_is_skipped_with_one_warning(images, tmp_path, monkeypatch, caplog):
    model, folder = tiny_clip(), tmp_path / "cache"
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with caplog.at_level(logging.WARNING):
        key = key_of(images, build_train_transform(model))
        supports = [cached(model, images, 2, folder, key) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"the features cache {folder} is not writable (Read-only file system): running without "
                        "that cache"]
    assert torch.equal(supports[0].features, supports[1].features) and not list(folder.glob("*.safetensors"))
