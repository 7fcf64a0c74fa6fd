"""What every benchmark prints beside its numbers: the machine, and medians of repetitions."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
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


def require_inputs(params_path: str | Path, targets: list[str], sources: list[str]) -> None:
    """Exit in one line, naming the command that makes them, when the prepared data, features
    or checkpoints that a fine-tuning benchmark reads (the study's, under data/) are not there."""
    from tasks.data.datasets import SPLITS  # here: generate.py's import must not need tasks
    from tasks.workspace.layout import Layout

    layout = Layout()
    needed = [layout.checkpoint(source) for source in sources] + [
        folder / f"{split}.npz"
        for target in targets
        for folder in (
            layout.prepared(target),
            *(layout.features(target, source) for source in sources),
        )
        for split in SPLITS
    ]
    missing = [path for path in needed if not path.exists()]
    if missing:
        extract = " ".join(f"extract@{target}" for target in targets)
        sys.exit(
            f"error: missing {missing[0]}: this benchmark reads the prepared data, features and "
            f"checkpoints of {params_path}; make them with `dvc repro {extract}` or "
            "`python -m flows.pipeline`"
        )
