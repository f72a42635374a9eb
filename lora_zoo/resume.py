"""Checkpoints of a run in progress: a killed run resumes where it stopped and ends as if it never stopped.

Every ``TrainConfig.checkpoint_every`` iterations the loop writes (atomically) one
file holding everything the rest of the run depends on: the adapter tensors, the
optimizer, scheduler and GradScaler states, the method schedule's state (DyLoRA's
sampler, AdaLoRA's importance scores), the random number generators (Python,
NumPy, torch CPU and CUDA) and the per-iteration loss and learning-rate history.
The data stream needs nothing: its batches are a function of the run seed and the
step (``datasets.loader.TrainStream(start_step=...)``). Everything built before
training (the model, calibration, the adapters' initial state) is deterministic
in the config, so a resumed run on the same machine ends bit-identical to an
uninterrupted one on CPU; the initial adapter snapshots are compared to make
sure the rebuilt adapters are the ones the checkpoint continues.

The file carries its own checksum: ``save`` stores the sha256 of every value of the
state (tensors by dtype, shape and bytes; numbers, strings and containers by their
text, in one fixed order) under ``checksum``, and ``load`` computes it again. A flipped
byte inside a tensor, which ``torch.load`` reads without complaint, is then a one-line
error naming the file and asking to delete it; so are a file ``torch.load`` cannot
read and a random-number state that cannot be restored (tried on a copy of the
current generators before anything is changed). One file, written atomically: the
checksum can never describe another version of it. Checkpoints written before the
checksum existed resume unchecked.

Bit-identical means at the same intra-op thread count on CPU: a matrix product summed over
other threads can change the last bits. The checkpoint carries the count of each process
that trained the run (``thread_history``), ``result.json`` records them all
(``threads_history``), and resuming with another count says so once.
"""
from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .files import atomic_write, torch_save
from .naming import adapter_state_dict
from .results import first_difference

CHECKSUM = "checksum"  # the key under which save() stores state_digest of the rest
THREADS = "threads"  # the key of the thread counts that trained the checkpoint (thread_history)
logger = logging.getLogger(__name__)


def capture(model: nn.Module, optimizer, scheduler, scaler, hooks, step: int, history: dict) -> dict[str, Any]:
    """The state of a run after ``step`` completed iterations."""
    return {
        "step": step,
        "adapters": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "hooks": hooks.state_dict(), "history": {k: list(v) for k, v in history.items()},
        "rng": {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }


def _numpy_state() -> dict:
    """NumPy's global RNG state in types ``torch.load(weights_only=True)`` reads (no NumPy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def state_digest(value, digest=None) -> str:
    """The sha256 hex digest of a checkpoint state: every tensor's dtype, shape and bytes and every other value's
    type and text, dictionaries in sorted key order. Covers what ``torch.load(weights_only=True)`` reads back."""
    top = digest is None
    digest = hashlib.sha256() if top else digest
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            digest.update(f"key {type(key).__name__} {key!r}\n".encode())
            state_digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            state_digest(item, digest)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        digest.update(f"{type(value).__name__} {value!r}\n".encode())
    else:
        raise TypeError(f"checkpoint state holds a {type(value).__name__}, which it cannot checksum")
    return digest.hexdigest() if top else ""


def save(path, state: dict) -> Path:
    """Write ``state`` with its checksum (``state_digest``), atomically."""
    sealed = {**state, CHECKSUM: state_digest(state)}
    return atomic_write(path, lambda tmp: torch_save(sealed, tmp))  # a full disk: one line naming path


def _check_integrity(state, path: Path) -> None:
    """One-line errors naming ``path`` for a state whose checksum or random-number state is damaged."""
    if not isinstance(state, dict):
        raise ValueError(f"the run's checkpoint {path} is not a lora_zoo checkpoint; delete it to start the run again")
    recorded = state.pop(CHECKSUM, None)
    if recorded is not None and state_digest(state) != recorded:
        raise ValueError(f"the run's checkpoint {path} is damaged (its content does not match the checksum saved "
                         "with it); delete it to start the run again")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    current = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        _set_rng(state["rng"])  # what restore() will do, tried now
    except Exception as err:  # noqa: BLE001 - each generator rejects a bad state with its own error type
        raise ValueError(f"the run's checkpoint {path} has a damaged random-number state ({type(err).__name__}); "
                         "delete it to start the run again") from None
    finally:
        random.setstate(current[0])
        np.random.set_state(current[1])
        torch.set_rng_state(current[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def load(path, setting: Optional[tuple] = None) -> Optional[dict]:
    """The checkpoint at ``path``, or None when there is none. A damaged one, or (given ``setting``) one written by a
    run with another setting (``results.setting_of``: every option that changes a number), is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise ValueError(f"cannot read the run's checkpoint {path} ({type(err).__name__}); delete it to "
                         "start the run again") from None
    _check_integrity(state, path)
    difference = None if setting is None else first_difference(state.get("setting", ()), setting)
    if difference:
        raise ValueError(f"the checkpoint {path} was written with other settings ({difference}); rerun with its "
                         "settings to resume it, or with --overwrite to start again")
    return state


def thread_history(state: Optional[dict], threads: int, iterations: int) -> list[Optional[int]]:
    """The intra-op thread count of each process that trains the run, this one (``threads``) last; ``state`` is the
    checkpoint it resumes (a count from before they were recorded is None). Resuming with another count than the
    last warns once, because it can change the last bits; a process with no iteration left to run adds none."""
    if state is None:
        return [threads]
    before = list(state.get(THREADS, [None]))
    if int(state["step"]) >= iterations:
        return before
    if before[-1] not in (None, threads):
        logger.warning("resuming with %d thread%s a run trained with %d so far: the last bits of its numbers can "
                       "differ from an uninterrupted run's (--threads %d resumes it as it ran)", threads,
                       "" if threads == 1 else "s", before[-1], before[-1])
    return before + [threads]


@torch.no_grad()
def restore(model: nn.Module, optimizer, scheduler, scaler, hooks, state: dict) -> int:
    """Put the run back in ``state``; returns the number of completed iterations."""
    current = adapter_state_dict(model)
    if set(current) != set(state["adapters"]):
        raise ValueError("the run's checkpoint holds other adapter tensors than this run builds; delete it "
                         "to start again")
    for name, tensor in current.items():
        if name.endswith("_init") and not torch.equal(tensor.cpu(), state["adapters"][name]):
            raise ValueError(f"the run's checkpoint continues another initialisation ({name} differs); "
                             "delete it to start again")
    named = model.state_dict(keep_vars=True)
    for key, tensor in state["adapters"].items():  # the rebuilt modules' own tensors, by qualified name
        named[key].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    hooks.load_state_dict(state["hooks"])
    _set_rng(state["rng"])
    return int(state["step"])


def _set_rng(rng: dict) -> None:
    """Set Python's, NumPy's, torch's and (when there is one) CUDA's generators to a captured state."""
    random.setstate(rng["python"])
    saved = rng["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["cached"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        for index, device_state in enumerate(rng["cuda"][:torch.cuda.device_count()]):  # the devices visible now
            torch.cuda.set_rng_state(device_state, index)
