"""What a run records about itself: package versions, the git commit, peak memory, and its log file.

Everything here is read-only with respect to the checkout (git is asked with
optional locks off) and never fails a run: a missing git just records null.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .files import write_error
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


class LogFile(logging.FileHandler):
    """A run's log file. A record it cannot write (a full disk) stops the run with one line naming the file
    (``files.WriteError``), where ``logging`` would print a traceback on stderr and go on without it."""

    def handleError(self, record: logging.LogRecord) -> None:
        failure = write_error(self.baseFilename, sys.exc_info()[1])
        if failure is None:
            super().handleError(record)
            return
        raise failure from None


class RunLog:
    """The run's log file for the ``lora_zoo`` and ``datasets`` loggers (DEBUG and up).

    Records are held in memory until ``attach(path)``: a run that fails before it has a
    folder (bad dataset path, missing weights) writes nothing to disk. A failure to write it
    is one ``files.WriteError`` naming it (``LogFile``).
    """

    def __init__(self):
        self.loggers = [logging.getLogger("lora_zoo"), logging.getLogger("datasets")]
        self.handler: logging.Handler = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)

    def attach(self, path: Path, append: bool = False) -> None:
        """Start writing to ``path`` (appending when a run resumes), with what was logged so far."""
        try:
            file_handler = LogFile(path, mode="a" if append else "w")
        except OSError as err:
            raise write_error(path, err) from None
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        memory = self.handler
        memory.setTarget(file_handler)
        try:
            memory.flush()
        except OSError as err:  # the file stays unwritten: its handler goes, the records are dropped with the run
            memory.setTarget(None)
            with contextlib.suppress(OSError):
                file_handler.close()
            raise write_error(path, err) from None
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
        try:
            self.handler.close()
        except OSError as err:  # its last flush (a full disk): the run's own error, if any, is the one to report
            if exc[0] is None:
                raise write_error(getattr(self.handler, "baseFilename", "the run's log"), err) from None
