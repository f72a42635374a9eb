"""Data-parallel training under ``torchrun``: the process group, which process writes, and PyTorch's DDP.

``torchrun --nproc_per_node N`` (or a Slurm launch setting the same variables) starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``; ``Dist.from_environment`` joins the process group (NCCL on CUDA, each process on
``cuda:LOCAL_RANK``; gloo on CPU). Rank 0 alone writes (the claim, the checkpoint, the log, the adapters, the
result); the others wait at ``barrier`` and learn rank 0's outcome through ``broadcast``, so a failure there (a
claimed run, a bad file) ends every process with the same one line. ``wrap`` puts the model in
``DistributedDataParallel``: only the adapters' trainable tensors are synchronised (the frozen base weights are
loaded identically by every process and left out of DDP's start-up broadcast), gradients are averaged across
processes at the last micro-batch of a step (``no_sync`` before it). One process is the same code with world 1.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world``; ``group`` is False for a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str = "auto") -> "Dist":
        """The torchrun variables, the process group joined when ``WORLD_SIZE`` > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        import torch.distributed as dist

        cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, local, True)

    def device(self, name: str) -> torch.device:
        """``name`` resolved (auto: CUDA when present); under torchrun on CUDA, this process's GPU."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if name.startswith("cuda") and self.group:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (any picklable object)."""
        if not self.group:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if not self.group:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        return sum(self.gather(float(value))) / self.world

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel over its trainable tensors (itself for one process)."""
        if not self.group:
            return model
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        device = next(p for p in model.parameters() if p.requires_grad).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False)

    @contextmanager
    def accumulating(self, model: nn.Module, last: bool):
        """Gradients of this micro-batch stay local unless it is the last of the step (``no_sync``)."""
        with (model.no_sync() if self.group and not last else nullcontext()):
            yield
