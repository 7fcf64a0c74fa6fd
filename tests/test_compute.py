"""Compute saved (tasks/analysis/compute.py) against a toy history checked by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tasks.analysis.compute import compute_table, epochs_to_reach, run_costs


def _run(source: str, strategy: str, seed: int, curve: list[float], **more) -> dict:
    return {
        "target": "t",
        "source": source,
        "strategy": strategy,
        "budget": "100%",
        "seed": seed,
        "n_labels": 100,
        "val_acc": max(curve) if curve else more.pop("val_acc"),
        "val_acc_curve": curve,
        "steps_per_epoch": 4 if curve else 0,
        "epoch_seconds": more.pop("epoch_seconds", 0.5),
    }


def test_epochs_to_reach_counts_until_the_first_epoch_at_the_goal() -> None:
    assert epochs_to_reach([0.2, 0.5, 0.7, 0.7], 0.7) == 3
    assert epochs_to_reach([0.9], 0.7) == 1
    assert epochs_to_reach([0.2, 0.5], 0.7) is None


def test_costs_multipliers_and_amortised_pretraining_by_hand() -> None:
    curves = pd.DataFrame(
        [
            # scratch peaks at 0.8 in its 4th epoch: 4 epochs x 4 steps, 4 x 0.5 s
            _run("", "scratch", 0, [0.3, 0.5, 0.7, 0.8, 0.75]),
            # finetune reaches 0.8 in its 2nd epoch: 8 steps, 1.0 s
            _run("src", "finetune", 0, [0.6, 0.8, 0.85]),
            # scratch of seed 1 peaks at 0.6 in its 2nd epoch: 8 steps, 1.0 s
            _run("", "scratch", 1, [0.5, 0.6, 0.55]),
            # finetune of seed 1 never reaches 0.6
            _run("src", "finetune", 1, [0.4, 0.5, 0.55]),
            # the probe reaches 0.8 (its val acc) in 0.25 s, with no steps
            _run("src", "linear_probe", 0, [], val_acc=0.81, epoch_seconds=0.25),
            _run("src", "linear_probe", 1, [], val_acc=0.59, epoch_seconds=0.25),
        ]
    )
    # pretraining took 3 s, shared by 2 targets: 1.5 s on each
    runs = run_costs(curves, {"src": {"seconds": 3.0, "steps": 1000}}, n_targets=2)
    first = runs[(runs.strategy == "finetune") & (runs.seed == 0)].iloc[0]
    assert (first.scratch_steps, first.steps) == (16, 8)
    assert (first.scratch_seconds, first.seconds) == (2.0, 1.0)
    assert first.multiplier_steps == 2.0 and first.multiplier_seconds == 2.0
    assert first.multiplier_with_pretraining == pytest.approx(2.0 / (1.0 + 1.5))
    missed = runs[(runs.strategy == "finetune") & (runs.seed == 1)].iloc[0]
    assert not missed.reached and math.isnan(missed.multiplier_steps)
    probe = runs[(runs.strategy == "linear_probe") & (runs.seed == 0)].iloc[0]
    assert probe.reached and math.isnan(probe.steps) and probe.seconds == 0.25
    assert probe.multiplier_seconds == 2.0 / 0.25

    table = compute_table(runs).set_index("strategy")
    finetune = table.loc["finetune"]
    assert (finetune.seeds_reached, finetune.n_seeds) == (1, 2)
    assert finetune.multiplier_steps == 2.0  # over the seed that reached it
    assert not finetune.paid_off  # a seed never got there
    probe = table.loc["linear_probe"]
    assert (probe.seeds_reached, probe.n_seeds) == (1, 2)  # 0.59 < 0.6
    # both seeds' multipliers with pretraining: 2 / (0.25 + 1.5), and seed 1 none
    assert probe.multiplier_with_pretraining == pytest.approx(2.0 / 1.75)


def test_a_cell_pays_off_when_every_seed_reaches_scratch_for_less() -> None:
    curves = pd.DataFrame(
        [
            _run("", "scratch", 0, [0.3, 0.5, 0.8]),
            _run("src", "finetune", 0, [0.8]),
            _run("", "scratch", 1, [0.3, 0.5, 0.8]),
            _run("src", "finetune", 1, [0.7, 0.8]),
        ]
    )
    cheap = compute_table(run_costs(curves, {"src": {"seconds": 0.2}}, n_targets=1))
    # seed 0: 1.5 / (0.5 + 0.2), seed 1: 1.5 / (1.0 + 0.2); their geometric mean
    expected = math.sqrt(1.5 / 0.7 * 1.5 / 1.2)
    assert cheap.multiplier_with_pretraining.iloc[0] == pytest.approx(expected)
    assert cheap.multiplier_steps.iloc[0] == pytest.approx(math.sqrt(3 * 1.5))
    assert bool(cheap.paid_off.iloc[0])
    dear = compute_table(run_costs(curves, {"src": {"seconds": 30.0}}, n_targets=1))
    assert not bool(dear.paid_off.iloc[0])  # faster to fine-tune, not once pretraining counts
