"""The training loop: it learns, stops early on validation, and is reproducible."""

from __future__ import annotations

import pytest
import torch

from tasks.config.params import ModelParams, TrainParams
from tasks.learning.train import DeviceData, evaluate, fit
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture

ARCH = architecture(ModelParams(channels=[8, 8]), (1, 16))


def toy(n: int, seed: int) -> DeviceData:
    """Two classes told apart by the sign of the signal's mean."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 16, generator=g) * 2.0 + (y * 2 - 1).float()[:, None, None]
    return DeviceData(x, y)


def train_once(seed: int, cfg: TrainParams):
    model = build_classifier(ARCH, 2, seed=seed)
    result = fit(
        model,
        [{"params": model.parameters(), "lr": 1e-2}],
        toy(256, 0),
        toy(128, 1),
        cfg,
        seed=seed,
    )
    return model, result


def test_fit_learns_and_keeps_the_best_epoch() -> None:
    model, result = train_once(0, TrainParams(max_epochs=8, patience=8, batch_size=32))
    assert result.best_val_acc > 0.95
    assert evaluate(model, toy(128, 1), 64)["acc"] == result.best_val_acc  # best weights restored
    best = max(range(len(result.history)), key=lambda e: result.history[e]["val/acc"])
    assert result.history[result.best_epoch]["val/acc"] == result.history[best]["val/acc"]


def test_early_stopping_stops_after_patience() -> None:
    _, result = train_once(0, TrainParams(max_epochs=200, patience=2, batch_size=32))
    assert len(result.history) == result.best_epoch + 3  # 2 epochs without improvement, then stop
    assert len(result.history) < 200


def test_without_validation_it_trains_the_full_schedule_and_keeps_the_last_weights() -> None:
    model = build_classifier(ARCH, 2, seed=0)
    cfg = TrainParams(max_epochs=4, patience=1, batch_size=32)
    result = fit(model, [{"params": model.parameters(), "lr": 1e-2}], toy(128, 0), None, cfg, 0)
    assert len(result.history) == 4 and result.best_epoch == 3
    assert list(result.history[0]) == ["train/loss"]
    assert evaluate(model, toy(128, 1), 64)["acc"] > 0.9


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    cfg = TrainParams(max_epochs=3, patience=3, batch_size=32)
    first, second, other = (train_once(s, cfg)[0].state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_compiled_training_matches_plain_and_keeps_the_state_dict() -> None:
    cfg = TrainParams(max_epochs=2, patience=2, batch_size=32)
    results = []
    for compile_model in (False, True):
        model = build_classifier(ARCH, 2, seed=0)
        groups = [{"params": model.parameters(), "lr": 1e-2}]
        result = fit(
            model, groups, toy(256, 0), toy(128, 1), cfg, seed=0, compile_model=compile_model
        )
        results.append((result, model.state_dict()))
    (plain, plain_state), (compiled, compiled_state) = results
    assert compiled_state.keys() == plain_state.keys()  # no `_orig_mod.` prefixes
    for got, want in zip(compiled.history, plain.history, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
