"""The vectorised ensemble gives each member what training it alone with `fit` gives."""

from __future__ import annotations

import copy

import pytest
import torch

import tasks.learning.ensemble as ensemble
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


def discriminative(model: torch.nn.Module) -> dict[str, float]:
    """The backbone at a tenth of the head's rate, as fine-tuning trains it."""
    return {name: 0.1 for name, _ in model.named_parameters() if name.startswith("backbone.")}


def alone(member: Member, cfg: TrainParams):
    """The member trained by itself through the ordinary loop, with torch.optim.Adam's own
    parameter groups."""
    model = copy.deepcopy(member.model)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(member.rates.get(name, 1.0), []).append(param)
    param_groups = [{"params": ps, "lr": member.lr * rate} for rate, ps in groups.items()]
    return fit(model, param_groups, member.train, member.val, cfg, seed=member.seed), model


@pytest.mark.parametrize(
    ("backbone", "vectorise"),
    [
        ("cnn1d", True),
        ("mlp", True),
        ("cnn1d", False),  # one after another (text encoders' path): each through `fit`
    ],
)
def test_ensemble_members_equal_separate_runs(
    backbone: str, vectorise: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = architecture(ModelParams(backbone=backbone, channels=[6, 6], hidden=[16]), (1, 24))
    cfg = TrainParams(max_epochs=14, patience=2, batch_size=16, weight_decay=1e-3)
    train, val = noisy(96, 0), noisy(90, 1)
    members = []
    # one stack of what a target's grid mixes: seeds x lrs; subsets of other sizes, so other
    # steps per epoch, and uneven last batches (30 = 16 + 14, 80 = 5 x 16); the first block
    # frozen for some (partial); the backbone at a tenth of the rate for some (transfer)
    # against every parameter at the run's lr (scratch). lrs high enough that runs plateau and
    # stop at different epochs.
    grid = [
        (0, 48, 0.1, 0, True),
        (0, 48, 0.03, 1, True),
        (1, 48, 0.1, 0, False),
        (2, 48, 0.3, 1, False),
        (3, 80, 0.1, 0, True),
        (4, 30, 0.1, 1, True),
        (5, 16, 0.3, 0, False),
    ]
    for seed, size, lr, frozen_blocks, transfer in grid:
        model = build_classifier(arch, 3, seed)
        model.backbone.blocks[:frozen_blocks].requires_grad_(False)
        subset = torch.randperm(96, generator=torch.Generator().manual_seed(seed))[:size]
        rates = discriminative(model) if transfer else {}
        data = DeviceData(train.x[subset], train.y[subset])
        members.append(Member(model, data, val, lr, seed, rates))
    before = [copy.deepcopy(m.model.state_dict()) for m in members]
    stacks = []
    monkeypatch.setattr(ensemble, "_Stack", lambda *a: stacks.append(a) or _Stack(*a))

    together = fit_ensemble(members, cfg, vectorise)

    assert len(stacks) == (1 if vectorise else 0)  # the whole grid in one stack
    stopped_at = set()
    for member, start, (result, model) in zip(members, before, together, strict=True):
        expected, expected_model = alone(member, cfg)
        assert result.best_epoch == expected.best_epoch
        assert len(result.history) == len(expected.history)
        for got, want in zip(result.history, expected.history, strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        for name, weight in expected_model.state_dict().items():
            # float rounding only: batched kernels sum in another order (none one by one)
            tolerance = {"rtol": 1e-4, "atol": 1e-5} if vectorise else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(model.state_dict()[name], weight, **tolerance)
        for name, param in member.model.named_parameters():
            if not param.requires_grad:  # a frozen weight never moves, stacked or not
                assert torch.equal(model.state_dict()[name], start[name])
        stopped_at.add(len(result.history))
    assert len(stopped_at) > 1  # members did leave the stack at different epochs
    for member, state in zip(members, before, strict=True):  # starting models untouched
        for name, weight in member.model.state_dict().items():
            assert torch.equal(weight, state[name])


_Stack = ensemble._Stack


def test_members_of_one_stack_share_their_validation_split() -> None:
    arch = architecture(ModelParams(channels=[4]), (1, 24))
    data = noisy(32, 0)
    members = [
        Member(build_classifier(arch, 3, seed), data, noisy(30, seed), 1e-2, seed)
        for seed in (0, 1)
    ]
    with pytest.raises(ValueError, match="share one validation split"):
        fit_ensemble(members, TrainParams(max_epochs=1))


def test_other_architectures_stack_through_vmap() -> None:
    """A text encoder (no written-out stacked forward) in one stack: each member equals its
    own run too."""
    text = ModelParams(backbone="transformer", width=8, layers=1, heads=2, ff_width=16)
    arch = architecture(text, (10,), {"vocab_size": 20, "pad_id": 0})
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> DeviceData:
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randint(3, 20, (n, 10), generator=g)
        x[:, 0] = y + 1  # the label's token leads
        return DeviceData(x, y)

    train, val = tokens(40), tokens(30)
    cfg = TrainParams(max_epochs=3, patience=2, batch_size=16)
    members = [
        Member(
            build_classifier(arch, 2, seed), DeviceData(train.x[:n], train.y[:n]), val, 3e-3, seed
        )
        for seed, n in [(0, 40), (1, 24)]
    ]
    for member, (result, model) in zip(members, fit_ensemble(members, cfg), strict=True):
        expected, expected_model = alone(member, cfg)
        assert len(result.history) == len(expected.history)
        for got, want in zip(result.history, expected.history, strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        for name, weight in expected_model.state_dict().items():
            # looser: Adam turns a near-zero gradient's rounding into a full step, and vmap's
            # batched attention and norms round otherwise (bench/text_ensemble.py: 1e-4 too)
            torch.testing.assert_close(model.state_dict()[name], weight, rtol=1e-3, atol=1e-3)
