"""The training data stream: the same batches whatever the worker count, the decoded cache or a resume;
the preprocessed test cache gives the same tensors as decoding; unreadable files are one clean error."""
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_clip
from datasets import DatasetError, build_data_loader, build_dataset, build_test_transform, build_train_transform
from datasets.cache import DecodedImages, PreprocessedImages
from datasets.loader import EpochBatches, TrainStream


@pytest.fixture(scope="module")
def dataset(data_root):
    return build_dataset("dtd", data_root, shots=3, seed=1)


def take(stream, count):
    batches = iter(stream)
    return [next(batches) for _ in range(count)]


def assert_same(first, second):
    assert len(first) == len(second)
    for (a, la), (b, lb) in zip(first, second):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_epoch_batches_cover_each_epoch_and_restart_anywhere():
    sampler = EpochBatches(size=10, batch_size=4, seed=3)
    batches = iter(sampler)
    epoch0 = [next(batches) for _ in range(3)]  # 4 + 4 + 2
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(i for b in epoch0 for e, i in b) == list(range(10)) and {e for b in epoch0 for e, _ in b} == {0}
    epoch1 = [next(batches) for _ in range(3)]
    assert [i for b in epoch1 for _, i in b] != [i for b in epoch0 for _, i in b]  # reshuffled
    late = iter(EpochBatches(size=10, batch_size=4, seed=3, start_step=4))
    assert next(late) == epoch1[1]


def test_train_batches_do_not_depend_on_workers_cache_or_resume(dataset):
    transform = build_train_transform(tiny_clip())
    reference = take(TrainStream(dataset.train_x, transform, batch_size=5, seed=7, num_workers=0), 6)
    assert_same(take(TrainStream(dataset.train_x, transform, 5, seed=7, num_workers=2), 6), reference)
    cached = DecodedImages(dataset.train_x, limit_mb=1)
    assert len(cached) == len(dataset.train_x)
    assert_same(take(TrainStream(dataset.train_x, transform, 5, seed=7, num_workers=0, images=cached), 6), reference)
    bounded = DecodedImages(dataset.train_x, limit_mb=5 * 32 * 32 * 4 / 2 ** 20)  # room for 5 of 12 images
    assert len(bounded) == 5 and bounded.bytes == 5 * 32 * 32 * 4  # Pillow's RGB: 4 bytes a pixel
    assert len(DecodedImages(dataset.train_x, limit_mb=5 * 32 * 32 * 3 / 2 ** 20)) == 3  # not 3 bytes a pixel
    assert_same(take(TrainStream(dataset.train_x, transform, 5, seed=7, num_workers=2, images=bounded), 6), reference)
    assert_same(take(TrainStream(dataset.train_x, transform, 5, seed=7, start_step=4), 2), reference[4:6])
    other = take(TrainStream(dataset.train_x, transform, 5, seed=8, num_workers=0), 1)
    assert not torch.equal(other[0][0], reference[0][0])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    take(TrainStream(dataset.train_x, transform, 5, seed=7, num_workers=0), 2)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched


def test_preprocessed_test_cache_gives_identical_tensors(dataset, tmp_path):
    transform = build_test_transform(tiny_clip())
    decoded = list(build_data_loader(dataset.test, transform, batch_size=5, num_workers=0))
    cache = PreprocessedImages(dataset.test, transform, tmp_path / "cache", batch_size=5)
    assert_same(list(cache), decoded)
    files = list((tmp_path / "cache").glob("images-*.npy"))
    assert len(files) == 1 and cache.array.dtype.name == "uint8" and cache.array.shape[0] == len(dataset.test)
    again = PreprocessedImages(dataset.test, transform, tmp_path / "cache", batch_size=3)
    assert again.path == cache.path and len(list((tmp_path / "cache").glob("*"))) == 1  # reused, not rewritten
    assert_same([(x, y) for x, y in again], list(build_data_loader(dataset.test, transform, 3, num_workers=0)))
    other = PreprocessedImages(dataset.test[:4], transform, tmp_path / "cache", batch_size=3)
    assert other.path != cache.path  # another image list, another file


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_one_clean_error(dataset, tmp_path, workers):
    data = list(dataset.train_x)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    data[3] = type(data[3])(str(bad), data[3].label, data[3].classname)
    transform = build_train_transform(tiny_clip())
    with pytest.raises(DatasetError) as caught:
        take(TrainStream(data, transform, batch_size=4, seed=1, num_workers=workers), 3)
    assert str(caught.value).startswith(f"cannot decode image {bad}") and "\n" not in str(caught.value)
    assert "Traceback" not in str(caught.value)
    with pytest.raises(DatasetError, match=f"cannot decode image {bad}"):
        list(build_data_loader(data, build_test_transform(tiny_clip()), batch_size=4, num_workers=workers))


def test_cpu_threads_leave_room_for_other_processes_and_workers(monkeypatch):
    """The default thread count is the cores other processes leave free, split with the loader workers."""
    import lora_zoo.train as train
    from lora_zoo import host

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train, "available_cpus", lambda: 4)
    before = torch.get_num_threads()
    try:
        cases = []
        for busy, workers, given in [(0.0, 0, None), (1.2, 0, None), (3.9, 0, None), (0.0, 1, None),
                                     (1.0, 1, None), (3.0, 0, 3)]:
            monkeypatch.setattr(train, "cpus_busy_elsewhere", lambda busy=busy: busy)
            cases.append(train.prepare_device(torch.device("cpu"), given, workers))
        assert cases == [4, 3, 1, 2, 1, 3]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert train.prepare_device(torch.device("cpu")) == 2  # the launcher's OMP_NUM_THREADS is respected
    finally:
        torch.set_num_threads(before)
    # The measurement itself: a spinning child process counts as about one busy CPU.
    import subprocess
    import sys
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        assert 0.7 < host.cpus_busy_elsewhere(0.5) < host.available_cpus() + 0.5
    finally:
        spinner.kill()
