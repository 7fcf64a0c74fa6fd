"""The fine-tuning protocol: the test split is scored, never used to choose."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config.params import FinetuneParams, ModelParams
from tasks.data.datasets import Labelled
from tasks.finetune import STRATEGIES, TargetData
from tasks.models.classifier import (
    architecture,
    build_classifier,
    load_checkpoint,
    save_checkpoint,
)

CFG = FinetuneParams(
    lrs=[1e-3, 1e-2], probe_l2=[1e-2, 1.0], max_epochs=6, patience=3, batch_size=16
)


def signals(n: int, seed: int) -> Labelled:
    """Three classes told apart by where a bump sits in a noisy 40-step signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (n, 1, 40)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 0, 5 + 12 * label : 12 + 12 * label] += 1.5
    return Labelled(x, y.astype(np.int64))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TargetData:
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pt"
    arch = architecture(ModelParams(channels=[4, 4]), (1, 40))
    save_checkpoint(path, build_classifier(arch, 3, seed=9))
    inputs = {"train": signals(60, 0), "val": signals(60, 1), "test": signals(60, 2)}
    return TargetData(
        name="bumps",
        inputs=inputs,
        features={s: Labelled(d.x.reshape(len(d), -1), d.y) for s, d in inputs.items()},
        num_classes=3,
        checkpoint=load_checkpoint(path),
        checkpoint_path=Path(path),
    )


def corrupt_test(data: TargetData) -> TargetData:
    """The same data with the test split's inputs moved and its labels permuted."""

    def corrupt(split: Labelled) -> Labelled:
        return Labelled(split.x * 10 + 3, (split.y + 1) % 3)

    return replace(
        data,
        inputs={**data.inputs, "test": corrupt(data.inputs["test"])},
        features={**data.features, "test": corrupt(data.features["test"])},
    )


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_choices_do_not_depend_on_the_test_split(data: TargetData, strategy: str) -> None:
    subsets = {0: np.arange(0, 60, 2), 1: np.arange(1, 60, 2)}
    cpu = torch.device("cpu")
    honest = STRATEGIES[strategy](data, subsets, CFG, cpu)
    corrupted = STRATEGIES[strategy](corrupt_test(data), subsets, CFG, cpu)
    for seed in subsets:
        assert honest[seed].hparams == corrupted[seed].hparams  # the same lr or l2 was chosen
        assert honest[seed].val_acc == corrupted[seed].val_acc
        assert [c.history for c in honest[seed].curves] == [
            c.history for c in corrupted[seed].curves
        ]
        assert honest[seed].test_acc != corrupted[seed].test_acc  # only the reported number moved
