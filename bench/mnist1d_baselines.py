"""Sanity check: our backbones trained from scratch on the standard MNIST-1D split, beside the
numbers published in the MNIST-1D README. If ours is far off, no transfer number is to be trusted.

    python bench/mnist1d_baselines.py [--seeds 3] [--params params.yaml]

Protocol of the published table: 4,000 train / 1,000 test examples from the default generator
args (`make_dataset(get_dataset_args())` reproduces the published pickle), Adam at lr 1e-2, batch
100, 6,000 steps, the weights after the last step (no validation split, so nothing is selected).
The architectures are those of params.yaml's `model` section.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from mnist1d.data import get_dataset_args, make_dataset

from tasks.config.params import TrainParams, load_params
from tasks.learning.train import DeviceData, evaluate, fit
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture

PUBLISHED = {"logistic regression": 0.32, "mlp": 0.68, "cnn1d": 0.94, "gru": 0.91}
STEPS, BATCH, LR = 6000, 100, 1e-2
TOLERANCE = 0.02  # the CNN must land within 2 points of the published 94%


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(params.runtime.threads)

    data = make_dataset(get_dataset_args())
    train = DeviceData(
        torch.from_numpy(data["x"].astype(np.float32)[:, None, :]),
        torch.from_numpy(data["y"].astype(np.int64)),
    )
    test = DeviceData(
        torch.from_numpy(data["x_test"].astype(np.float32)[:, None, :]),
        torch.from_numpy(data["y_test"].astype(np.int64)),
    )
    epochs = STEPS * BATCH // len(train)  # 4,000 examples / 100 per step: 40 steps an epoch
    schedule = TrainParams(max_epochs=epochs, patience=epochs, batch_size=BATCH)

    machine = platform.processor() or platform.machine()
    print(
        f"MNIST-1D standard split: {len(train)} train / {len(test)} test; {STEPS} steps of "
        f"{BATCH}, Adam lr {LR}; {args.seeds} seeds; {machine}, torch {torch.__version__}, "
        f"{params.runtime.threads} thread(s)"
    )
    failed = False
    for backbone in ("cnn1d", "mlp"):
        model_params = params.model.model_copy(update={"backbone": backbone})
        arch = architecture(model_params, (1, 40))
        scores, started = [], time.perf_counter()
        for seed in range(args.seeds):
            model = build_classifier(arch, 10, seed=seed)
            fit(model, [{"params": model.parameters(), "lr": LR}], train, None, schedule, seed)
            scores.append(evaluate(model, test, 1000)["acc"])
        mean, spread = statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0
        gap = mean - PUBLISHED[backbone]
        verdict = ""
        if backbone == "cnn1d":
            failed = abs(gap) > TOLERANCE
            verdict = "  FAIL: beyond 2 points" if failed else "  ok: within 2 points"
        print(
            f"{backbone:>6}: ours {mean:.2%} ± {spread:.2%} (per seed "
            f"{', '.join(f'{s:.1%}' for s in scores)}), published {PUBLISHED[backbone]:.0%}, "
            f"difference {gap * 100:+.1f} points, {time.perf_counter() - started:.0f} s{verdict}"
        )
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
