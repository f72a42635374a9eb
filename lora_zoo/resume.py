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
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .adapter import adapter_modules
from .files import atomic_write
from .naming import adapter_state_dict
from .results import first_difference


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


def save(path, state: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


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
    difference = None if setting is None else first_difference(state.get("setting", ()), setting)
    if difference:
        raise ValueError(f"the checkpoint {path} was written with other settings ({difference}); rerun with its "
                         "settings to resume it, or with --overwrite to start again")
    return state


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
    for prefix, adapter in adapter_modules(model).items():
        for name, tensor in adapter.state_dict().items():
            key = f"{prefix}.{name}"
            if key in state["adapters"]:
                getattr(adapter, name).copy_(state["adapters"][key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    hooks.load_state_dict(state["hooks"])
    random.setstate(state["rng"]["python"])
    saved = state["rng"]["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["cached"]))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
