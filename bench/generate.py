"""Wall time of the published MNIST-1D generator (`mnist1d.data.make_dataset`, a Python loop per
example) beside the vectorised one (`tasks.data.mnist1d_fast.make_dataset_fast`) at 100,000
examples, default args otherwise.

    python bench/generate.py [--samples 100000] [--reference-reps 1] [--fast-reps 3]

The reference takes ~20 s per repetition at 100k, so by default it runs once; the fast generator
runs 3 times (after an untimed warm-up at 1k) and its median is taken.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import numpy as np
import scipy
from _common import cpu_name, summary, timed
from mnist1d.data import get_dataset_args, make_dataset
from mnist1d.utils import ObjectView

from tasks.data.mnist1d_fast import make_dataset_fast


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

    print(summary("reference mnist1d.data.make_dataset", reference))
    print(summary("fast make_dataset_fast", fast))
    ratio = statistics.median(reference) / statistics.median(fast)
    print(f"speed-up at {opts.samples:,} examples: {ratio:.1f}x")


if __name__ == "__main__":
    main()
