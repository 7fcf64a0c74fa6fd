"""Stage `compare`: transfer against scratch, from the result files alone.

Writes reports/comparison.csv (one row per target x strategy x fraction), comparison.md,
plots/<target>.png (test accuracy against labels) and metrics.json for `dvc metrics show`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import pandas as pd

from tasks import files
from tasks.cli import run_stage
from tasks.layout import Layout
from tasks.params import Params
from tasks.tracking import Run

log = logging.getLogger(__name__)
KEYS = ["target", "strategy", "fraction"]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds per cell, and the gain over scratch paired by seed."""
    scratch = results[results.strategy == "scratch"][["target", "fraction", "seed", "test_acc"]]
    paired = results.merge(
        scratch, on=["target", "fraction", "seed"], how="left", suffixes=("", "_scratch"),
        validate="m:1",
    )  # fmt: skip
    unpaired = paired[paired.test_acc_scratch.isna()]
    if len(unpaired):
        first = unpaired.iloc[0]
        raise ValueError(
            f"{len(unpaired)} result rows have no scratch run to pair with, e.g. target "
            f"{first.target!r} fraction {first.fraction} seed {first.seed}"
        )
    paired["gain"] = paired.test_acc - paired.test_acc_scratch
    table = (
        paired.groupby(KEYS, sort=False)
        .agg(
            n_labels=("n_labels", "first"),
            n_seeds=("seed", "nunique"),
            test_acc_mean=("test_acc", "mean"),
            test_acc_std=("test_acc", "std"),
            gain_vs_scratch=("gain", "mean"),
            gain_std=("gain", "std"),
            val_acc_mean=("val_acc", "mean"),
        )
        .reset_index()
    )
    return table.sort_values(["target", "fraction", "strategy"], kind="stable", ignore_index=True)


def read_results(path: Path) -> pd.DataFrame:
    """A results file as written by `finetune`; names stay strings ('NA' is a valid target)."""
    return pd.read_csv(
        path, dtype={"target": str, "strategy": str}, keep_default_na=False,
        na_values={"lr": [""], "l2": [""]},
    )  # fmt: skip


def plot_target(table: pd.DataFrame, target: str, path: Path) -> None:
    rows = table[table.target == target]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for strategy, curve in rows.groupby("strategy", sort=False):
        curve = curve.sort_values("n_labels")
        ax.errorbar(
            curve.n_labels,
            curve.test_acc_mean,
            yerr=curve.test_acc_std.fillna(0),
            marker="o",
            capsize=3,
            label=strategy,
        )
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(f"target: {target}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def headline_metrics(table: pd.DataFrame) -> dict:
    """Per target and strategy: mean test accuracy (and, for transfer, the gain over scratch) at
    each label fraction."""
    metrics: dict = {}
    for row in table.itertuples():
        cell = metrics.setdefault(row.target, {}).setdefault(row.strategy, {})
        numbers = {"test_acc": round(row.test_acc_mean, 6)}
        if row.strategy != "scratch":
            numbers["gain_vs_scratch"] = round(row.gain_vs_scratch, 6)
        cell[f"f{row.fraction:g}"] = numbers
    return metrics


def compare(params: Params, layout: Layout, run: Run) -> pd.DataFrame:
    results = pd.concat(
        [read_results(layout.results(t)) for t in params.targets], ignore_index=True
    )
    table = summarise(results)
    reports = layout.reports
    files.write_text(reports / "comparison.csv", table.to_csv(index=False))
    files.write_text(
        reports / "comparison.md", table.to_markdown(index=False, floatfmt=".4f") + "\n"
    )
    files.write_json(reports / "metrics.json", headline_metrics(table))
    for target in params.targets:
        plot_target(table, target, reports / "plots" / f"{target}.png")
    with run.child("compare", tags={"stage": "compare"}) as stage:
        stage.log(metrics={"n_runs": len(results)})
    for name in ("comparison.csv", "comparison.md", "metrics.json"):
        run.log_artifact(reports / name)
    for target in params.targets:
        run.log_artifact(reports / "plots" / f"{target}.png", "plots")
    log.info("comparison written to %s", reports)
    return table


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, compare, argv)


if __name__ == "__main__":
    main()
