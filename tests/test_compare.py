"""The comparison tables on hand-made results whose answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tasks.analysis.statistics import HELPS, NO_DIFFERENCE, NO_VARIATION
from tasks.compare import (
    headline_metrics,
    headlines,
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
        rows.append(("t", "scratch", "10%", seed, 10, scratch, scratch))
        rows.append(("t", "linear_probe", "10%", seed, 10, probe, probe))
        rows.append(("t", "finetune", "10%", seed, 10, tuned, 0.1))  # val says: worse
        rows.append(("t", "scratch", "100%", seed, 100, 0.9, 0.9))
        rows.append(("t", "linear_probe", "100%", seed, 100, 0.8 + 0.01 * seed, 0.8))
        rows.append(("t", "finetune", "100%", seed, 100, 0.9, 0.9))
    frame = pd.DataFrame(
        rows, columns=["target", "strategy", "budget", "seed", "n_labels", "test_acc", "val_acc"]
    )
    frame = frame.assign(per_class=(frame.n_labels // 2).astype(str), val_loss=1 - frame.val_acc)
    return with_source(frame)


def with_source(frame: pd.DataFrame) -> pd.DataFrame:
    """Results of one source, `src` (scratch's source is empty, as `finetune` writes it)."""
    return frame.assign(source=frame.strategy.map(lambda s: "" if s == "scratch" else "src"))


def cell(table: pd.DataFrame, strategy: str, budget: str) -> pd.Series:
    return table.set_index(["strategy", "budget"]).loc[(strategy, budget)]


def test_means_intervals_and_paired_gain() -> None:
    table = summarise(results())
    probe = cell(table, "linear_probe", "10%")
    assert probe.n_seeds == 3 and probe.n_labels == 10
    assert probe.test_acc_mean == pytest.approx(0.70)
    assert probe.test_acc_std == pytest.approx(0.05)  # sample std of 0.70, 0.65, 0.75
    half = 4.302653 * 0.05 / math.sqrt(3)  # t(0.975, df 2) * s / sqrt(n)
    assert probe.test_acc_ci_low == pytest.approx(0.70 - half, rel=1e-5)
    # paired gains 0.20, 0.05, 0.35: mean 20 points, std 15 (gains are in points)
    assert probe.gain_pts == pytest.approx(20)
    assert probe.gain_pts_std == pytest.approx(15)
    assert probe.gain_pts_ci_high == pytest.approx(20 + 4.302653 * 15 / math.sqrt(3), rel=1e-5)
    assert probe.relative_error_reduction == pytest.approx((0.5 - 0.3) / 0.5)
    assert probe.verdict == NO_DIFFERENCE  # 3 seeds: the interval reaches below zero
    # +0.4, +0.3, +0.5: above zero on every seed
    assert cell(table, "finetune", "10%").verdict == HELPS
    assert cell(table, "finetune", "100%").verdict == NO_VARIATION  # +0 on every seed
    assert cell(table, "scratch", "10%").verdict == "baseline"


def test_effective_data_multiplier_on_the_scratch_curve() -> None:
    table = summarise(results())
    # scratch: 0.5 at 10 labels, 0.9 at 100; the probe's 0.70 sits halfway in log space
    probe = cell(table, "linear_probe", "10%")
    assert (
        probe.data_multiplier == pytest.approx(math.sqrt(10))
        and probe.data_multiplier_censored == ""
    )
    # the probe's 0.81 at 100 labels: scratch already has 0.81 below 100 labels
    assert cell(table, "linear_probe", "100%").data_multiplier < 1
    # finetune's 0.9 at 10 labels: scratch needs all 100
    assert cell(table, "finetune", "10%").data_multiplier == pytest.approx(10)


def test_required_columns_come_first() -> None:
    required = [
        "target",
        "source",
        "strategy",
        "arm",
        "budget",
        "n_labels",
        "per_class",
        "n_seeds",
        "test_acc_mean",
        "test_acc_std",
        "gain_pts",
    ]
    assert list(summarise(results()).columns[: len(required)]) == required


def test_verdicts_choose_the_strategy_on_validation_not_test() -> None:
    verdicts = pick_verdicts(summarise(results())).set_index("budget")
    assert verdicts.loc["10%", "strategy"] == "linear_probe"  # finetune wins on test, not val
    assert verdicts.loc["100%", "strategy"] == "finetune"  # 0.9 val beats the probe's 0.8


def test_val_ties_go_to_the_lower_val_loss_then_to_the_simpler_strategy() -> None:
    frame = results()
    tied = frame.assign(val_acc=0.5, val_loss=0.7)
    for strategy in ("lp_ft", "partial"):  # two more strategies, tied with the others
        tied = pd.concat([tied, tied[tied.strategy == "finetune"].assign(strategy=strategy)])
    verdicts = pick_verdicts(summarise(tied)).set_index("budget")
    assert verdicts.loc["10%", "strategy"] == "linear_probe"  # all tied: the simplest
    lower_loss = tied.strategy.eq("lp_ft") & tied.budget.eq("100%")
    tied.loc[lower_loss, "val_loss"] = 0.6
    verdicts = pick_verdicts(summarise(tied)).set_index("budget")
    assert verdicts.loc["100%", "strategy"] == "lp_ft"  # same accuracy, lower loss
    assert verdicts.loc["10%", "strategy"] == "linear_probe"


def test_curve_summary_and_headline_metrics() -> None:
    table = summarise(results())
    summary = summarise_curves(table).set_index(["target", "strategy"])
    # scratch: 0.5 -> 0.9 over one decade: AULC 0.7; finetune: flat 0.9
    assert summary.loc[("t", "scratch"), "aulc"] == pytest.approx(0.7)
    assert summary.loc[("t", "finetune"), "aulc_gain_pts"] == pytest.approx(20)
    assert summary.loc[("t", "finetune"), "data_multiplier_at_fewest_labels"] == "10x"
    assert summary.loc[("t", "finetune"), "data_multiplier_at_most_labels"] == "1x"  # equal
    found = headlines(summarise_curves(table), pick_verdicts(table))["t"]
    # finetune has the better test AULC (0.9 flat against the probe's 0.70 -> 0.81), but the
    # probe the better validation AULC (0.75 against 0.5): the choice is made on validation
    assert found.best_strategy == "linear_probe"
    assert found.aulc_gain_pts == pytest.approx((0.755 - 0.7) * 100)
    metrics = headline_metrics({"t": found})["t"]
    assert metrics == {
        "aulc_gain_pts": pytest.approx(5.5),
        "gain_pts_fewest_labels": pytest.approx(20),  # the probe at 10 labels, chosen on val
        "gain_pts_most_labels": pytest.approx(0),  # finetune at 100 labels
    }
    assert (
        found.texts()["fewest_labels"]
        == "10%: no significant difference (linear_probe, +20.0 points)"
    )


def test_a_transfer_row_without_its_scratch_partner_is_an_error() -> None:
    frame = results()
    frame = frame[~((frame.strategy == "scratch") & (frame.seed == 2) & (frame.budget == "100%"))]
    with pytest.raises(ValueError, match=r"2 result rows have no scratch run .* seed 2"):
        summarise(frame)


def test_results_keep_na_like_target_names(tmp_path) -> None:
    path = tmp_path / "NA.csv"
    results().assign(target="NA", lr=float("nan"), l2=0.1).to_csv(path, index=False)
    frame = read_results(path)
    assert set(frame.target) == {"NA"} and frame.lr.isna().all()
    assert len(summarise(frame)) == 6


def test_the_data_multiplier_agrees_with_the_gain_on_a_non_monotone_scratch_curve() -> None:
    rows = []
    for seed in range(3):
        for budget, n, scratch, probe in [
            ("a", 10, 0.3, 0.35),
            ("b", 100, 0.7, 0.6),
            ("c", 1000, 0.5, 0.55),
        ]:
            rows.append(("t", "scratch", budget, seed, n, scratch + 0.01 * seed))
            rows.append(("t", "linear_probe", budget, seed, n, probe + 0.01 * seed))
    frame = pd.DataFrame(
        rows, columns=["target", "strategy", "budget", "seed", "n_labels", "test_acc"]
    )
    frame = frame.assign(val_acc=frame.test_acc, val_loss=0.5, per_class="1")
    table = summarise(with_source(frame))
    probe = table[table.strategy == "linear_probe"].set_index("budget")
    # at "c" the probe beats scratch by 5 points, though scratch scored more at "b": the
    # multiplier must say scratch needs more labels than the probe, never fewer
    assert probe.loc["c", "gain_pts"] == pytest.approx(5)
    assert (
        probe.loc["c", "data_multiplier"] > 1 or probe.loc["c", "data_multiplier_censored"] == ">"
    )
    assert probe.loc["b", "data_multiplier"] < 1  # 10 points below scratch at "b"
    assert probe.loc["a", "data_multiplier"] > 1
