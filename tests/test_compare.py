"""The comparison table on hand-made results whose answers are known."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.compare import headline_metrics, summarise


def results() -> pd.DataFrame:
    rows = []
    for seed, scratch, probe in [(0, 0.50, 0.70), (1, 0.60, 0.65), (2, 0.40, 0.75)]:
        rows.append(("t", "scratch", 0.1, seed, 10, scratch))
        rows.append(("t", "linear_probe", 0.1, seed, 10, probe))
    rows.append(("t", "scratch", 1.0, 0, 100, 0.9))
    rows.append(("t", "linear_probe", 1.0, 0, 100, 0.8))
    frame = pd.DataFrame(
        rows, columns=["target", "strategy", "fraction", "seed", "n_labels", "test_acc"]
    )
    return frame.assign(val_acc=frame.test_acc)


def test_means_spread_and_paired_gain() -> None:
    table = summarise(results()).set_index(["strategy", "fraction"])
    probe = table.loc[("linear_probe", 0.1)]
    assert probe.n_seeds == 3 and probe.n_labels == 10
    assert probe.test_acc_mean == pytest.approx(0.70)
    assert probe.test_acc_std == pytest.approx(0.05)  # sample std of 0.70, 0.65, 0.75
    # paired gains 0.20, 0.05, 0.35: mean 0.20, std 0.15
    assert probe.gain_vs_scratch == pytest.approx(0.20)
    assert probe.gain_std == pytest.approx(0.15)
    assert table.loc[("scratch", 0.1)].gain_vs_scratch == 0
    assert table.loc[("linear_probe", 1.0)].gain_vs_scratch == pytest.approx(-0.1)


def test_required_columns_and_metrics() -> None:
    table = summarise(results())
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
    assert list(table.columns[: len(required)]) == required
    metrics = headline_metrics(table)
    assert metrics["t"]["linear_probe"]["f0.1"]["gain_vs_scratch"] == pytest.approx(0.2)
    assert metrics["t"]["scratch"]["f1"] == {"test_acc": pytest.approx(0.9)}
