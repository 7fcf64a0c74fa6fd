"""The vectorised ensemble gives each member what training it alone with `fit` gives."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.config.params import ModelParams, TrainParams
from tasks.learning.ensemble import Member, fit_ensemble
from tasks.learning.train import DeviceData, fit
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture


def noisy(n: int, seed: int) -> DeviceData:
    """Three classes, by where a bump sits, under enough noise that runs plateau and stop early
    at different epochs (which exercises members leaving the stack)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 24, generator=g)
    for i, label in enumerate(y.tolist()):
        x[i, 0, 8 * label : 8 * label + 6] += 1.0
    return DeviceData(x, y)


def scale(name: str) -> float:
    return 0.1 if name.startswith("backbone.") else 1.0  # discriminative, as fine-tuning uses


def alone(member: Member, val: DeviceData, cfg: TrainParams):
    """The member trained by itself through the ordinary loop."""
    model = copy.deepcopy(member.model)
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [
        {"params": trainable, "lr": member.lr * 0.1},
        {"params": model.head.parameters(), "lr": member.lr},
    ]
    return fit(model, groups, member.train, val, cfg, seed=member.seed), model


@pytest.mark.parametrize(
    ("backbone", "frozen_blocks", "vectorise"),
    [
        *[("cnn1d", 0, True), ("cnn1d", 1, True), ("mlp", 0, True), ("mlp", 1, True)],
        ("cnn1d", 1, False),  # one after another (text encoders' path): each through `fit`
    ],
)
def test_ensemble_members_equal_separate_runs(
    backbone: str, frozen_blocks: int, vectorise: bool
) -> None:
    arch = architecture(ModelParams(backbone=backbone, channels=[6, 6], hidden=[16]), (1, 24))
    cfg = TrainParams(max_epochs=14, patience=2, batch_size=16, weight_decay=1e-3)
    train, val = noisy(96, 0), noisy(90, 1)
    members = []
    # seeds x lrs on one subset size, plus a member of another size (its own stack); lrs high
    # enough that runs plateau and stop at different epochs
    for seed, size, lr in [(0, 48, 0.1), (0, 48, 0.03), (1, 48, 0.1), (2, 48, 0.3), (3, 80, 0.1)]:
        model = build_classifier(arch, 3, seed)
        model.backbone.blocks[:frozen_blocks].requires_grad_(False)
        subset = torch.randperm(96, generator=torch.Generator().manual_seed(seed))[:size]
        members.append(Member(model, DeviceData(train.x[subset], train.y[subset]), lr, seed))
    before = [copy.deepcopy(m.model.state_dict()) for m in members]

    together = fit_ensemble(members, val, cfg, scale, vectorise)

    stopped_at = set()
    for member, (result, model) in zip(members, together, strict=True):
        expected, expected_model = alone(member, val, cfg)
        assert result.best_epoch == expected.best_epoch
        assert len(result.history) == len(expected.history)
        for got, want in zip(result.history, expected.history, strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        for name, weight in expected_model.state_dict().items():
            # float rounding only: batched kernels sum in another order (none one by one)
            tolerance = {"rtol": 1e-4, "atol": 1e-5} if vectorise else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(model.state_dict()[name], weight, **tolerance)
        stopped_at.add(len(result.history))
    assert len(stopped_at) > 1  # members did leave the stack at different epochs
    for member, state in zip(members, before, strict=True):  # starting models untouched
        for name, weight in member.model.state_dict().items():
            assert torch.equal(weight, state[name])


def test_members_of_one_stack_must_train_the_same_parameters() -> None:
    arch = architecture(ModelParams(channels=[4]), (1, 24))
    data = noisy(32, 0)
    models = [build_classifier(arch, 3, seed) for seed in (0, 1)]
    models[1].backbone.blocks[:1].requires_grad_(False)
    members = [Member(model, data, 1e-2, seed) for seed, model in enumerate(models)]
    with pytest.raises(ValueError, match="train different parameters"):
        fit_ensemble(members, data, TrainParams(max_epochs=1))
