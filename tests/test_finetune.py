"""The fine-tuning protocol: the test split is scored, never used to choose."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config.params import FinetuneParams, ModelParams
from tasks.data.datasets import Labelled
from tasks.data.subsets import Budget
from tasks.finetune import PROBE, STRATEGIES, Group, TargetData, grid_groups, train_cells
from tasks.learning.ensemble import fit_ensemble
from tasks.models.classifier import (
    build_classifier,
    load_checkpoint,
    save_checkpoint,
)
from tasks.models.shapes import architecture

CPU = torch.device("cpu")
CFG = FinetuneParams(
    lrs=[1e-3, 1e-2], probe_l2=[1e-2, 1.0], max_epochs=6, patience=3, batch_size=16
)


def signals(n: int, seed: int) -> Labelled:
    """Three classes told apart by the frequency of a noisy 40-step wave (random phase)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    t = np.arange(40)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = np.sin(2 * np.pi * (0.05 + 0.1 * y[:, None]) * t + phase) + rng.normal(0, 0.3, (n, 40))
    return Labelled(x[:, None, :].astype(np.float32), y.astype(np.int64))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TargetData:
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pt"
    arch = architecture(ModelParams(channels=[4, 4]), (1, 40))
    backbone = build_classifier(arch, 3, seed=9)
    save_checkpoint(path, backbone)
    inputs = {"train": signals(60, 0), "val": signals(60, 1), "test": signals(60, 2)}
    with torch.no_grad():  # what `extract` writes: the backbone's features (N, 4)
        features = {
            s: Labelled(backbone.features(torch.from_numpy(d.x)).numpy(), d.y)
            for s, d in inputs.items()
        }
    return TargetData(
        name="waves",
        source="src",
        inputs=inputs,
        features=features,
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
    subsets = {("b", 0): np.arange(0, 60, 2), ("b", 1): np.arange(1, 60, 2)}
    honest = train_cells(data, [strategy], subsets, CFG, CPU)
    corrupted = train_cells(corrupt_test(data), [strategy], subsets, CFG, CPU)
    assert set(honest) == {(strategy, "b", 0), (strategy, "b", 1)}
    for cell in honest:
        assert honest[cell].hparams == corrupted[cell].hparams  # the same lr or l2 was chosen
        assert honest[cell].val_acc == corrupted[cell].val_acc
        assert [c.history for c in honest[cell].curves] == [
            c.history for c in corrupted[cell].curves
        ]
        assert honest[cell].test_acc != corrupted[cell].test_acc  # only the reported number moved


def test_a_fresh_input_layer_trains_at_the_heads_rate_and_is_never_frozen(
    data: TargetData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.finetune as finetune

    # the same target with 3 channels: the pretrained 1-channel input layer cannot take it
    three = {s: Labelled(np.repeat(d.x, 3, axis=1), d.y) for s, d in data.inputs.items()}
    seen = {}

    def spy(members, cfg, vectorise):
        model = members[0].model
        seen["trains"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["scale"] = {n: members[0].rates.get(n, 1.0) for n, _ in model.named_parameters()}
        return fit_ensemble(members, cfg, vectorise)

    monkeypatch.setattr(finetune, "fit_ensemble", spy)
    cfg = CFG.model_copy(update={"freeze_blocks": 1, "backbone_lr_scale": 0.1})
    subsets = {("b", 0): np.arange(30)}
    outcome = train_cells(replace(data, inputs=three), ["partial"], subsets, cfg, CPU)
    fresh = {"backbone.blocks.0.0.weight", "backbone.blocks.0.0.bias"}
    assert fresh <= seen["trains"]  # in the frozen block, yet trained
    assert {n for n in seen["scale"] if n.startswith("backbone.blocks.1")} <= seen["trains"]
    assert all(seen["scale"][n] == 1.0 for n in fresh | {"head.weight", "head.bias"})
    assert seen["scale"]["backbone.blocks.1.0.weight"] == 0.1  # pretrained: discriminative
    assert outcome["partial", "b", 0].val_acc > 1 / 3  # it learns through the fresh layer


def test_a_targets_network_cells_train_as_one_stack_and_the_probe_is_solved_once(
    data: TargetData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.finetune as finetune

    stacks, probes = [], []

    def spy_ensemble(members, cfg, vectorise):
        stacks.append([(m.lr, m.seed, len(m.train)) for m in members])
        return fit_ensemble(members, cfg, vectorise)

    def spy_probe(data, subset, cfg):
        probes.append(len(subset))
        return fit_probe(data, subset, cfg)

    fit_probe = finetune._fit_probe
    monkeypatch.setattr(finetune, "fit_ensemble", spy_ensemble)
    monkeypatch.setattr(finetune, "_fit_probe", spy_probe)
    # two budgets of other sizes (other steps per epoch), two seeds, every strategy
    subsets = {
        (budget, seed): np.random.default_rng(seed).permutation(60)[:size]
        for budget, size in (("small", 12), ("large", 48))
        for seed in (0, 1)
    }
    outcomes = train_cells(data, STRATEGIES, subsets, CFG, CPU)

    assert set(outcomes) == {(s, *key) for s in STRATEGIES for key in subsets}
    networks = [s for s in STRATEGIES if s != PROBE]
    assert len(stacks) == 1  # every network strategy, budget, seed and lr: one ensemble
    assert len(stacks[0]) == len(networks) * len(subsets) * len(CFG.lrs)
    assert {size for _, _, size in stacks[0]} == {12, 48}
    assert sorted(probes) == [12, 12, 48, 48]  # once per subset, for linear_probe and lp_ft
    for key in subsets:  # LP-FT's head is the probe's solution of its own subset
        assert outcomes["lp_ft", *key].hparams["l2"] == outcomes[PROBE, *key].hparams["l2"]
    # the stack's seconds are shared by optimizer steps: an epoch of 48 labels is 3 steps of
    # 16, one of 12 labels 1; LP-FT's epochs carry its probe's seconds too
    for seed in (0, 1):
        small, large = (outcomes["finetune", budget, seed] for budget in ("small", "large"))
        assert large.epoch_seconds == pytest.approx(3 * small.epoch_seconds)
        lp_ft = outcomes["lp_ft", "large", seed]
        probe = outcomes[PROBE, "large", seed].epoch_seconds
        chosen = next(c for c in lp_ft.curves if c.lr == lp_ft.hparams["lr"])
        assert lp_ft.epoch_seconds == pytest.approx(
            large.epoch_seconds + probe / len(chosen.history)
        )


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_takes_a_target_of_another_channel_count_and_length(
    data: TargetData, strategy: str
) -> None:
    # 3 channels of length 60, against a backbone pretrained on 1 channel of length 40
    def reshaped(d: Labelled) -> Labelled:
        return Labelled(np.repeat(np.concatenate([d.x, d.x[..., :20]], -1), 3, axis=1), d.y)

    other = replace(data, inputs={s: reshaped(d) for s, d in data.inputs.items()})
    outcome = train_cells(other, [strategy], {("b", 0): np.arange(30)}, CFG, CPU)[strategy, "b", 0]
    assert 0 <= outcome.test_acc <= 1 and outcome.val_acc > 0


def test_a_group_per_source_with_scratch_in_the_first() -> None:
    budgets = (Budget("10%", (2, 2)), Budget("100%", (20, 20)))
    strategies = ["scratch", "linear_probe", "lp_ft"]
    groups = grid_groups(["a", "b"], strategies, budgets, (0, 1), finished=set())
    assert groups == [
        Group("a", ("scratch", "linear_probe", "lp_ft"), budgets, (0, 1)),
        Group("b", ("linear_probe", "lp_ft"), budgets, (0, 1)),
    ]
    scratch = [key for key in groups[0].cells if key[1] == "scratch"]
    assert {source for source, *_ in scratch} == {""}  # scratch's cells: no source
    assert len(scratch) == len(budgets) * 2
    # a group whose every cell is in the progress file is not trained again
    again = grid_groups(["a", "b"], strategies, budgets, (0, 1), finished=set(groups[1].cells))
    assert again == groups[:1]
