"""What every benchmark prints beside its numbers: the machine, and medians of repetitions."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> str:
    """One line: CPU model and count, OS, Python, torch and its intra-op threads."""
    import torch  # here: generate.py's machine line must not need torch

    line = (
        f"machine: {cpu_name()}, {os.cpu_count()} CPU(s), {platform.system()}; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    return line + (f", {threads} intra-op thread(s)" if threads is not None else "")


def timed(run: Callable[[], Any], reps: int) -> list[float]:
    """Wall seconds of `reps` calls of `run`."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def summary(name: str, times: list[float], unit: str = "s") -> str:
    """'name: median X s of N run(s) [each]'."""
    runs = ", ".join(f"{t:.3f}" for t in times)
    return f"{name}: median {statistics.median(times):.3f} {unit} of {len(times)} run(s) [{runs}]"
