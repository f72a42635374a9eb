"""Training curves of a run: always a CSV in the run folder, TensorBoard or Weights & Biases on request.

``curves.csv`` holds one row per iteration (iteration, loss, learning rate of the
first parameter group); it is rewritten at every checkpoint and at the end, so
a killed run keeps its curve. ``log_to`` names optional extra sinks — "tensorboard"
(``torch.utils.tensorboard``, needs the ``tensorboard`` package; events in
``<run folder>/tensorboard``) and "wandb" (the ``wandb`` package, its usual
login and project settings) — which get the logged mean loss and the learning
rate every ``log_every`` iterations. Neither is a dependency: asking for one that
is not installed is a one-line error before anything trains.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any, Iterable

from .files import atomic_write

SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package it needs
CURVES_FILE = "curves.csv"


def check_sinks(log_to: Iterable[str]) -> None:
    """A one-line error for an unknown sink or one whose package is not installed."""
    for sink in log_to:
        if sink not in SINKS:
            raise ValueError(f"unknown log_to {sink!r}; expected some of {', '.join(SINKS)}")
        if importlib.util.find_spec(SINKS[sink]) is None:
            raise ValueError(f"log_to {sink} needs the {SINKS[sink]} package (pip install {SINKS[sink]})")


def write_curves(folder, curves: dict[str, list]) -> Path:
    """``curves.csv``: iteration, loss, lr — one row per completed iteration."""
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["iteration", "loss", "lr"])
            out.writerows((i + 1, f"{loss:.6g}", f"{lr:.6g}") for i, (loss, lr) in
                          enumerate(zip(curves["loss"], curves["lr"])))
    return atomic_write(Path(folder) / CURVES_FILE, write)


class Sinks:
    """The requested extra sinks; ``log(step, loss, lr)`` forwards to each, ``close()`` ends them."""

    def __init__(self, log_to: Iterable[str], folder: Path, name: str, config: dict[str, Any]):
        check_sinks(log_to)
        self.tensorboard = self.wandb = None
        if "tensorboard" in log_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))
        if "wandb" in log_to:
            import wandb
            self.wandb = wandb.init(name=name, config=config, dir=str(folder), reinit=True)

    def log(self, step: int, loss: float, lr: float) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("train/loss", loss, step)
            self.tensorboard.add_scalar("train/lr", lr, step)
        if self.wandb is not None:
            self.wandb.log({"train/loss": loss, "train/lr": lr}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
