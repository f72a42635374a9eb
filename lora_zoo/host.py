"""The machine a run is on and the package it runs: CPUs free for it, versions. Imports nothing heavy.

A primitive both packages use (``datasets`` sizes its decode threads and loader workers
with ``available_cpus``), so it must stay cheap to import: the package versions that
``versions()`` reports are read from the modules already imported, or imported there.
"""
from __future__ import annotations

import os
import platform
import time

__version__ = "0.2.0"


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
    import numpy
    import open_clip
    import torch
    import torchvision

    found = {"torch": torch.__version__, "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
             "numpy": numpy.__version__}
    return {"python": platform.python_version(), **found, "lora_zoo": __version__}
