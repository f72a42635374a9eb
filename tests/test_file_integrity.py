"""Damaged files are never used: adapters and checkpoints carry a sha256, and loading them checks it.

Each case damages a real file the way a disk, a copy or a hand edit does (a flipped byte inside a tensor, a
truncation, an empty file, a random-number state that cannot be restored) and expects one line naming the file,
never a traceback and never a number computed from the damaged bytes.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_zoo as lz
from lora_zoo import resume as resume_state
from lora_zoo.checkpoint import config_path
from lora_zoo.cli import sigterm_as_interrupt
from lora_zoo.config import load_config
from lora_zoo.experiment import STATE_FILE, run_dir, run_experiment
from lora_zoo.files import atomic_write, torch_save
from lora_zoo.hooks import TrainingHooks
from lora_zoo.models import build_clip

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def flip_inside(path: Path, needle: bytes) -> None:
    """Flip one bit in the middle of the first occurrence of ``needle`` (a tensor's bytes) in ``path``."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ---- adapters ----------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = build_clip("tiny-vit", seed=0).model
    torch.manual_seed(0)
    lz.apply_adapters(model, "lora", rank=2)
    with torch.no_grad():
        for p in lz.trainable_parameters(model):
            p.add_(0.01 * torch.randn_like(p))  # as if trained
    path = lz.save_adapters(model, tmp_path / "adapters.safetensors")
    return path, lz.adapter_state_dict(model)


def fresh():
    return build_clip("tiny-vit", seed=0).model


def test_adapter_file_records_its_sha256_and_loads_when_intact(saved):
    path, tensors = saved
    assert json.loads(config_path(path).read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = fresh()
    lz.load_adapters(model, path)
    loaded = lz.adapter_state_dict(model)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty"])
def test_damaged_adapter_file_is_one_line_naming_it(saved, damage):
    path, tensors = saved
    if damage == "flipped byte":
        name = next(n for n in tensors if n.endswith("lora_B"))
        flip_inside(path, tensors[name].numpy().tobytes())
    else:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError) as err:
        lz.load_adapters(fresh(), path)
    assert str(err.value) == (f"adapter file {path} does not match the sha256 recorded in adapters.json (damaged, "
                              "truncated or replaced since it was saved); restore it or train the run again")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unparsable_adapter_file_without_a_checksum_is_one_line(saved, damage):
    path, _ = saved
    meta = json.loads(config_path(path).read_text())
    del meta["sha256"], meta["record_sha256"]  # as saved before the checksums were recorded
    config_path(path).write_text(json.dumps(meta))
    path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"")
    with pytest.raises(ValueError) as err:
        lz.load_adapters(fresh(), path)
    message = str(err.value)
    assert message.startswith(f"cannot read adapter file {path} (SafetensorError: ") and "\n" not in message
    assert message.endswith("restore it or train the run again")


def small_run(data_root, out):
    return load_config([], dict(method="lora", root_path=str(data_root), output_dir=str(out), backbone="tiny-vit",
                                shots=1, n_iters=2, batch_size=4, num_workers=0, eval_batch_size=16))


def test_eval_only_of_a_damaged_adapter_file_exits_with_one_line(data_root, tmp_path):
    cfg = small_run(data_root, tmp_path / "out")
    run_experiment(cfg, progress=False)
    folder = run_dir(cfg)
    adapters = folder / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[:-7])
    proc = subprocess.run([sys.executable, "main.py", "--method", "lora", "--root_path", str(data_root),
                           "--output_dir", str(tmp_path / "out"), "--backbone", "tiny-vit", "--shots", "1",
                           "--num_workers", "0", "--eval_only", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: adapter file {adapters} does not match the sha256 recorded")
    assert not (folder / "eval.json").exists()


# ---- the checkpoint of a run in progress -----------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint state: a LoRA model after two AdamW steps, its scheduler, scaler and random generators."""
    model = build_clip("tiny-vit", seed=0).model
    torch.manual_seed(0)
    lz.apply_adapters(model, "lora", rank=2, encoders=("vision",))
    optimizer = torch.optim.AdamW(lz.trainable_parameters(model), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    for _ in range(2):
        model.encode_image(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    state = resume_state.capture(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                 TrainingHooks(), step=2, history={"loss": [1.0, 0.5], "lr": [1e-2, 5e-3]})
    return tmp_path / STATE_FILE, state


def test_checkpoint_round_trips_with_its_checksum(checkpoint):
    path, state = checkpoint
    resume_state.save(path, state)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    loaded = resume_state.load(path)
    assert resume_state.CHECKSUM not in loaded
    assert resume_state.state_digest(loaded) == resume_state.state_digest(state)
    assert all(torch.equal(loaded["adapters"][k], v) for k, v in state["adapters"].items())
    # loading tried the saved generator states and left the current ones as they were
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_checkpoint_digest_sees_every_value():
    state = {"step": 3, "adapters": {"a.lora_A": torch.ones(2, 2)}, "history": {"loss": [1.0]}}
    digest = resume_state.state_digest(state)
    assert digest == resume_state.state_digest({**state}) and len(digest) == 64
    changed = [{**state, "step": 4}, {**state, "adapters": {"a.lora_A": torch.ones(2, 2).double()}},
               {**state, "adapters": {"a.lora_A": torch.ones(4)}}, {**state, "history": {"loss": [1.0000001]}},
               {**state, "adapters": {"a.lora_A": torch.tensor([[1.0, 1.0], [1.0, float.fromhex("0x1.000002p0")]])}}]
    assert len({digest, *map(resume_state.state_digest, changed)}) == 1 + len(changed)


@pytest.mark.parametrize("damage", ["flipped tensor byte", "flipped rng byte", "truncated", "empty",
                                    "rng state damaged"])
def test_damaged_checkpoint_is_one_line_asking_to_delete_it(checkpoint, damage):
    path, state = checkpoint
    if damage == "rng state damaged":  # saved that way, so its checksum matches: restoring it is what fails
        state["rng"]["torch"] = torch.zeros(16, dtype=torch.uint8)
    resume_state.save(path, state)
    if damage == "flipped tensor byte":
        flip_inside(path, state["adapters"][next(n for n in state["adapters"] if n.endswith("lora_A"))].numpy().tobytes())
    elif damage == "flipped rng byte":
        flip_inside(path, state["rng"]["torch"].numpy().tobytes()[100:400])
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        resume_state.load(path)
    message = str(err.value)
    expected = {"rng state damaged": "has a damaged random-number state (RuntimeError)",
                "truncated": "(", "empty": "("}.get(damage, "is damaged (its content does not match the checksum")
    assert str(path) in message and expected in message and "\n" not in message
    assert message.endswith("delete it to start the run again")


def test_a_run_stops_on_its_damaged_checkpoint_with_one_line(data_root, tmp_path, checkpoint):
    _, state = checkpoint
    cfg = small_run(data_root, tmp_path / "out")
    folder = run_dir(cfg)
    folder.mkdir(parents=True)
    state["rng"]["python"] = (3, (1, 2, 3), None)  # not a Mersenne Twister state
    resume_state.save(folder / STATE_FILE, state)
    with pytest.raises(ValueError) as err:
        run_experiment(cfg, progress=False)
    assert str(err.value) == (f"the run's checkpoint {folder / STATE_FILE} has a damaged random-number state "
                              "(ValueError); delete it to start the run again")
    assert not (folder / "result.json").exists()


def test_cuda_generator_states_are_restored_for_the_devices_visible_now(checkpoint, monkeypatch):
    """A checkpoint written with two GPUs visible resumes where one is (a resubmitted Slurm job): the saved
    states of the visible devices are set, the others ignored, instead of an error about a damaged state."""
    path, state = checkpoint
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    state["rng"]["cuda"] = saved
    resume_state.save(path, state)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("all", len(states))))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, device: calls.append((int(value[0]), device)))
    loaded = resume_state.load(path)
    assert calls == [(1, 0), ("all", 1)]  # tried on device 0, then the current state put back
    assert [torch.equal(a, b) for a, b in zip(loaded["rng"]["cuda"], saved)] == [True, True]


class _SignalWhenPickled:
    """Sends ``signum`` to this process while ``torch.save`` is pickling it (mid-write); loads back as 3."""

    def __init__(self, *signums):
        self.signums = signums

    def __reduce__(self):
        for signum in self.signums:
            signal.raise_signal(signum)
        return int, (3,)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_during_a_checkpoint_write_waits_for_the_file(signum, tmp_path):
    """Ctrl-C or SIGTERM inside torch's zip writer used to surface as torch's "unexpected pos" error with no
    checkpoint; the write now finishes (the file is whole and loads) and the interrupt is raised after it."""
    path = tmp_path / "checkpoint.pt"
    state = {"a": torch.arange(4000.0), "mid": _SignalWhenPickled(signum), "b": torch.ones(3000)}
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda tmp: torch_save(state, tmp))
    loaded = torch.load(path, weights_only=False)
    assert loaded["mid"] == 3 and torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are given back


def test_a_second_interrupt_during_a_write_stops_it_at_once_and_leaves_no_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = {"a": torch.arange(10.0), "mid": _SignalWhenPickled(signal.SIGINT, signal.SIGINT)}
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        atomic_write(path, lambda tmp: torch_save(state, tmp))
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
