"""Where a run's time and memory go: wall seconds per category (:class:`Timers`: goodput is step
compute, the rest badput), peak memory, the ETA format and the process start time that start-up
is counted from. Used by :mod:`megacpp_mcore.train.loop`."""

from __future__ import annotations

import datetime
import resource
import time
from typing import Any

import torch


def peak_memory_bytes() -> dict[str, Any]:
    """Peak device memory on CUDA (allocated by torch), else the process's peak RSS."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    return {"kind": "cpu_max_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def fmt_eta(seconds: float) -> str:
    """``H:MM:SS`` of a non-negative whole number of seconds."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Timers:
    """Wall seconds per category (goodput = step compute; the rest is badput)."""

    def __init__(self):
        self.seconds = {"startup": 0.0, "step_compute": 0.0, "data_wait": 0.0,
                        "evaluation": 0.0, "checkpoint": 0.0}

    def add(self, name: str, since: float) -> float:
        """Adds the seconds since ``since`` to ``name``; returns now."""
        now = time.perf_counter()
        self.seconds[name] += now - since
        return now


def process_start() -> float:
    """When this process was created (epoch seconds): start-up includes the imports."""
    import psutil

    return psutil.Process().create_time()
