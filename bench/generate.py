"""Wall time of the published MNIST-1D generator (`mnist1d.data.make_dataset`, a Python loop per
example) beside the vectorised one (`tasks.mnist1d_fast.make_dataset_fast`) at 100,000 examples,
default args otherwise.

    python bench/generate.py [--samples 100000] [--reference-reps 1] [--fast-reps 3]

The reference takes ~20 s per repetition at 100k, so by default it runs once; the fast generator
runs 3 times (after an untimed warm-up at 1k) and its median is taken.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy
from mnist1d.data import get_dataset_args, make_dataset
from mnist1d.utils import ObjectView

from tasks.mnist1d_fast import make_dataset_fast


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(run: Callable[[], dict], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--reference-reps", type=int, default=1)
    parser.add_argument("--fast-reps", type=int, default=3)
    opts = parser.parse_args()
    args = get_dataset_args(as_dict=True) | {"num_samples": opts.samples}

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPU(s), {platform.system()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    print(f"sizes: {opts.samples:,} examples of length {args['final_seq_length']}, default args")

    make_dataset_fast(args | {"num_samples": 1000})  # warm-up: imports, first allocations
    fast = timed(lambda: make_dataset_fast(args), opts.fast_reps)
    reference = timed(lambda: make_dataset(ObjectView(dict(args))), opts.reference_reps)

    def line(name: str, times: list[float]) -> str:
        runs = ", ".join(f"{t:.3f}" for t in times)
        return f"{name}: median {statistics.median(times):.3f} s of {len(times)} run(s) [{runs}]"

    print(line("reference mnist1d.data.make_dataset", reference))
    print(line("fast make_dataset_fast", fast))
    ratio = statistics.median(reference) / statistics.median(fast)
    print(f"speed-up at {opts.samples:,} examples: {ratio:.1f}x")


if __name__ == "__main__":
    main()
