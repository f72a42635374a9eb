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
from pathlib import Path
from typing import Any

from .host import versions


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


def peak_memory(device) -> dict[str, Any]:
    """CUDA max allocated on a GPU, the process's max RSS elsewhere (MiB)."""
    if device.type == "cuda":
        import torch

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
