"""The comparison tables on hand-made results whose answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tasks.analysis.statistics import HELPS, NO_DIFFERENCE
from tasks.compare import (
    headline_metrics,
    pick_verdicts,
    read_results,
    summarise,
    summarise_curves,
)


def results() -> pd.DataFrame:
    """Target t: scratch and a probe at 10 and 100 labels (3 seeds), plus a finetune run that
    is better on test but worse on validation at 10 labels."""
    rows = []
    for seed, scratch, probe, tuned in [
        (0, 0.50, 0.70, 0.9),
        (1, 0.60, 0.65, 0.9),
        (2, 0.40, 0.75, 0.9),
    ]:
        rows.append(("t", "scratch", 0.1, seed, 10, scratch, scratch))
        rows.append(("t", "linear_probe", 0.1, seed, 10, probe, probe))
        rows.append(("t", "finetune", 0.1, seed, 10, tuned, 0.1))  # val says: worse
        rows.append(("t", "scratch", 1.0, seed, 100, 0.9, 0.9))
        rows.append(("t", "linear_probe", 1.0, seed, 100, 0.8 + 0.01 * seed, 0.8))
        rows.append(("t", "finetune", 1.0, seed, 100, 0.9, 0.9))
    return pd.DataFrame(
        rows, columns=["target", "strategy", "fraction", "seed", "n_labels", "test_acc", "val_acc"]
    )


def cell(table: pd.DataFrame, strategy: str, fraction: float) -> pd.Series:
    return table.set_index(["strategy", "fraction"]).loc[(strategy, fraction)]


def test_means_intervals_and_paired_gain() -> None:
    table = summarise(results())
    probe = cell(table, "linear_probe", 0.1)
    assert probe.n_seeds == 3 and probe.n_labels == 10
    assert probe.test_acc_mean == pytest.approx(0.70)
    assert probe.test_acc_std == pytest.approx(0.05)  # sample std of 0.70, 0.65, 0.75
    half = 4.302653 * 0.05 / math.sqrt(3)  # t(0.975, df 2) * s / sqrt(n)
    assert probe.test_acc_ci_low == pytest.approx(0.70 - half, rel=1e-5)
    # paired gains 0.20, 0.05, 0.35: mean 0.20, std 0.15
    assert probe.gain_vs_scratch == pytest.approx(0.20)
    assert probe.gain_std == pytest.approx(0.15)
    assert probe.gain_ci_high == pytest.approx(0.20 + 4.302653 * 0.15 / math.sqrt(3), rel=1e-5)
    assert probe.relative_error_reduction == pytest.approx((0.5 - 0.3) / 0.5)
    assert probe.verdict == NO_DIFFERENCE  # 3 seeds: the interval reaches below zero
    assert cell(table, "finetune", 0.1).verdict == HELPS  # +0.4 on every seed
    assert cell(table, "scratch", 0.1).verdict == "baseline"


def test_effective_data_multiplier_on_the_scratch_curve() -> None:
    table = summarise(results())
    # scratch: 0.5 at 10 labels, 0.9 at 100; the probe's 0.70 sits halfway in log space
    probe = cell(table, "linear_probe", 0.1)
    assert (
        probe.data_multiplier == pytest.approx(math.sqrt(10))
        and probe.data_multiplier_censored == ""
    )
    # the probe's 0.81 at 100 labels: scratch already has 0.81 below 100 labels
    assert cell(table, "linear_probe", 1.0).data_multiplier < 1
    # finetune's 0.9 at 10 labels: scratch needs all 100
    assert cell(table, "finetune", 0.1).data_multiplier == pytest.approx(10)


def test_required_columns_come_first() -> None:
    required = [
        "target",
        "strategy",
        "fraction",
        "n_labels",
        "n_seeds",
        "test_acc_mean",
        "test_acc_std",
        "gain_vs_scratch",
    ]
    assert list(summarise(results()).columns[: len(required)]) == required


def test_verdicts_choose_the_strategy_on_validation_not_test() -> None:
    verdicts = pick_verdicts(summarise(results())).set_index("fraction")
    assert verdicts.loc[0.1, "strategy"] == "linear_probe"  # finetune wins on test, not on val
    assert verdicts.loc[1.0, "strategy"] == "finetune"  # 0.9 val beats the probe's 0.8


def test_curve_summary_and_headline_metrics() -> None:
    table = summarise(results())
    summary = summarise_curves(table).set_index(["target", "strategy"])
    # scratch: 0.5 -> 0.9 over one decade: AULC 0.7; finetune: flat 0.9
    assert summary.loc[("t", "scratch"), "aulc"] == pytest.approx(0.7)
    assert summary.loc[("t", "finetune"), "aulc_gain_vs_scratch"] == pytest.approx(0.2)
    assert summary.loc[("t", "finetune"), "data_multiplier_at_min_fraction"] == "10x"
    assert summary.loc[("t", "finetune"), "data_multiplier_at_max_fraction"] == "1x"  # equal
    metrics = headline_metrics(summarise_curves(table), table)
    assert metrics["t"]["finetune"]["gain_fewest_labels"] == pytest.approx(0.4)
    assert metrics["t"]["scratch"] == {"aulc": pytest.approx(0.7)}


def test_a_transfer_row_without_its_scratch_partner_is_an_error() -> None:
    frame = results()
    frame = frame[~((frame.strategy == "scratch") & (frame.seed == 2) & (frame.fraction == 1.0))]
    with pytest.raises(ValueError, match=r"2 result rows have no scratch run .* seed 2"):
        summarise(frame)


def test_results_keep_na_like_target_names(tmp_path) -> None:
    path = tmp_path / "NA.csv"
    results().assign(target="NA", lr=float("nan"), l2=0.1).to_csv(path, index=False)
    frame = read_results(path)
    assert set(frame.target) == {"NA"} and frame.lr.isna().all()
    assert len(summarise(frame)) == 6
