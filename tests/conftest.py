"""Shared fixtures: tiny open_clip models (random init, built in code) and inputs for them; CLIP-LoRA's draw.

The suite's temporary files (pytest's ``tmp_path`` folders and whatever the tests and their subprocesses put
in the system's temporary folder) go under one folder that is removed when the suite ends: it leaves nothing
in /tmp (``--basetemp DIR`` puts pytest's folders in DIR instead and keeps them).
"""
import os
import random
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_zoo.models import build_clip


SCRATCH = {}  # "folder": the suite's temporary folder, "TMPDIR": the variable as the suite found it


@pytest.hookimpl(tryfirst=True)  # before pytest's own tmp_path plugin reads --basetemp
def pytest_configure(config):
    folder = Path(tempfile.mkdtemp(prefix="lora_zoo_tests_"))
    (folder / "tmp").mkdir()
    SCRATCH.update(folder=folder, TMPDIR=os.environ.get("TMPDIR"))
    if config.option.basetemp is None:
        config.option.basetemp = str(folder / "pytest")
    os.environ["TMPDIR"] = str(folder / "tmp")  # tempfile here and in every subprocess of a test
    tempfile.tempdir = None  # read TMPDIR again


def pytest_unconfigure(config):
    if "folder" not in SCRATCH:
        return
    shutil.rmtree(SCRATCH.pop("folder"), ignore_errors=True)
    previous = SCRATCH.pop("TMPDIR")
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous
    tempfile.tempdir = None


def tiny_clip(backbone: str = "tiny-vit", seed: int = 0):
    """A fresh tiny open_clip CLIP model (eval mode, CPU); same seed → same weights."""
    return build_clip(backbone, seed=seed).model


def clip_lora_draw(items, shots):
    """CLIP-LoRA's ``generate_fewshot_dataset``, re-implemented on (path, label, classname) items with the global
    RNG: per label in order of first appearance, ``random.sample`` (``random.choices`` for a short class)."""
    by_label = defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    out = []
    for group in by_label.values():
        out += random.sample(group, shots) if len(group) >= shots else random.choices(group, k=shots)
    return out


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def texts():
    """Token ids with an EOT (49407) and zero padding after it, as open_clip's tokenizer gives."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.zeros(4, 32, dtype=torch.long)
    for row, length in enumerate((5, 9, 14, 20)):
        tokens[row, 0] = 49406
        tokens[row, 1:length - 1] = torch.randint(1, 49000, (length - 2,), generator=g)
        tokens[row, length - 1] = 49407
    return tokens


def synthetic_datasets(root, classes: dict, train_per_class=4, val_per_class=2, test_per_class=4, image_size=32):
    """Write each synthetic dataset of ``classes`` (name -> number of classes) under ``root``, in the CoOp layout,
    with these sizes (images per class; pixels); returns ``root``."""
    from datasets import write_synthetic_dataset
    for name, count in classes.items():
        write_synthetic_dataset(root, name, num_classes=count, train_per_class=train_per_class,
                                val_per_class=val_per_class, test_per_class=test_per_class, image_size=image_size)
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A small synthetic DTD (4 classes; 4 train, 2 val, 4 test images each; 32 px) in the CoOp layout."""
    return synthetic_datasets(tmp_path_factory.mktemp("data"), {"dtd": 4})


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model runs: they gain nothing from more, and OpenMP
    spinning collapses when the cores are shared with another process."""
    threads, launched = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # what runs started in this process see: prepare_device keeps 1 thread
    yield
    torch.set_num_threads(threads)
    if launched is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = launched


class FixedDropout(nn.Module):
    """Dropout with a given (pre-scaled) mask in training, the identity in eval: the same mask on two sides."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask if self.training else x


def cli(capsys, *args) -> tuple[int, str]:
    """``main.py ARGS`` in this process: (exit code, what it printed on stderr)."""
    from lora_zoo.cli import run

    capsys.readouterr()
    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The one line ``err`` holds (it must hold exactly one)."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err[:-1]


def killed_at(step: int):
    """``lora_zoo.train.training_step`` as it is now, but a Ctrl-C (KeyboardInterrupt) once a run reaches ``step``:
    patched in, it kills the run there (its last checkpoint stays for the resume)."""
    import lora_zoo.train as train
    original = train.training_step

    def step_or_interrupt(model, inputs, labels, classes, optimizer, hooks, at, *rest, **kwargs):
        if at == step:
            raise KeyboardInterrupt
        return original(model, inputs, labels, classes, optimizer, hooks, at, *rest, **kwargs)
    return step_or_interrupt


@pytest.fixture
def encoded_views(monkeypatch):
    """The views each ``features.encode_views`` call encodes, in order: ``[(first view, views), ...]``."""
    import lora_zoo.features as features
    calls, real = [], features.encode_views

    def encode(*args, first=0, **kwargs):
        calls.append((first, args[3]))
        return real(*args, first=first, **kwargs)
    monkeypatch.setattr(features, "encode_views", encode)
    return calls
