"""What a run records about itself: package versions, the git commit, peak memory, and its log file.

Everything here is read-only with respect to the checkout (git is asked with
optional locks off) and never fails a run: a missing git just records null.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torchvision

from . import __version__


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    with open("/proc/self/stat") as handle:
        own = handle.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def cpus_busy_elsewhere(window: float = 0.3) -> float:
    """How many CPUs other processes keep busy, measured over ``window`` seconds (0.0 where /proc is absent)."""
    try:
        busy0, own0 = _cpu_jiffies()
        start = time.perf_counter()
        time.sleep(window)
        busy1, own1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK") * (time.perf_counter() - start)
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / ticks)


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "numpy": np.__version__, "lora_zoo": __version__}


def environment() -> dict[str, Any]:
    """Package versions, host name and the git commit of this checkout (with a dirty flag)."""
    info = {"versions": versions(), "git_commit": None, "git_dirty": None, "host": platform.node()}
    repo, env = Path(__file__).resolve().parents[1], dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=10)
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def peak_memory(device: torch.device) -> dict[str, Any]:
    """CUDA max allocated on a GPU, the process's max RSS elsewhere (MiB)."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20, "peak_memory_kind": "cuda_allocated"}
    import resource
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_kind": "cpu_maxrss"}


class RunLog:
    """The run's log file for the ``lora_zoo`` and ``datasets`` loggers (DEBUG and up).

    Records are held in memory until ``attach(path)``: a run that fails before it has a
    folder (bad dataset path, missing weights) writes nothing to disk.
    """

    def __init__(self):
        self.loggers = [logging.getLogger("lora_zoo"), logging.getLogger("datasets")]
        self.handler: logging.Handler = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)

    def attach(self, path: Path, append: bool = False) -> None:
        """Start writing to ``path`` (appending when a run resumes), with what was logged so far."""
        file_handler = logging.FileHandler(path, mode="a" if append else "w")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        memory = self.handler
        memory.setTarget(file_handler)
        memory.flush()
        for lg in self.loggers:
            lg.removeHandler(memory)
            lg.addHandler(file_handler)
        memory.close()
        self.handler = file_handler

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self.handler)
            if lg.level == logging.NOTSET or lg.level > logging.DEBUG:
                lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self.handler)
            lg.setLevel(level)
        self.handler.close()
