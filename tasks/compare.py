"""Stage `compare`: transfer against scratch, with statistics, from the result files alone.

Writes to reports/:
- comparison.csv / .md: one row per target x strategy x label fraction (means, intervals, paired
  gains, relative error reduction, effective data multiplier, verdict);
- summary.csv: one row per target x strategy (area under the learning curve, data multipliers);
- verdicts.csv: one row per target x fraction (the best transfer strategy, chosen on validation);
- report.md with plots/<target>_{curves,gain,features}.png, and metrics.json for DVC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.analysis import plots, report
from tasks.analysis.statistics import (
    Multiplier,
    area_under_curve,
    effective_data_multiplier,
    paired_difference,
    relative_error_reduction,
    t_interval,
    verdict,
)
from tasks.config.params import Params
from tasks.data.datasets import load_meta, load_split
from tasks.frame import stage_command
from tasks.recording.recorder import Recorder
from tasks.workspace import files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)
KEYS = ["target", "strategy", "fraction"]


@dataclass(frozen=True)
class Comparison:
    table: pd.DataFrame  # target x strategy x fraction
    summary: pd.DataFrame  # target x strategy
    verdicts: pd.DataFrame  # target x fraction


def read_results(path: Path) -> pd.DataFrame:
    """A results file as written by `finetune`; names stay strings ('NA' is a valid target)."""
    return pd.read_csv(
        path,
        dtype={"target": str, "strategy": str},
        keep_default_na=False,
        na_values={"lr": [""], "l2": [""]},
    )


def pair_with_scratch(results: pd.DataFrame) -> pd.DataFrame:
    """Each row beside the scratch run of the same target, fraction and seed (same subset)."""
    scratch = results[results.strategy == "scratch"][["target", "fraction", "seed", "test_acc"]]
    paired = results.merge(
        scratch,
        on=["target", "fraction", "seed"],
        how="left",
        suffixes=("", "_scratch"),
        validate="m:1",
    )
    unpaired = paired[paired.test_acc_scratch.isna()]
    if len(unpaired):
        first = unpaired.iloc[0]
        raise ValueError(
            f"{len(unpaired)} result rows have no scratch run to pair with, e.g. target "
            f"{first.target!r} fraction {first.fraction} seed {first.seed}"
        )
    return paired.assign(gain=paired.test_acc - paired.test_acc_scratch)


def _cell(runs: pd.DataFrame) -> dict:
    """The statistics of one target x strategy x fraction over its seeds."""
    accuracy = t_interval(runs.test_acc)
    gain = paired_difference(runs.test_acc, runs.test_acc_scratch)  # same seed, same subset
    transfer = runs.strategy.iloc[0] != "scratch"
    return {
        "n_labels": runs.n_labels.iloc[0],
        "n_seeds": runs.seed.nunique(),
        "test_acc_mean": accuracy.mean,
        "test_acc_std": runs.test_acc.std(),
        "gain_vs_scratch": gain.mean,
        "test_acc_ci_low": accuracy.low,
        "test_acc_ci_high": accuracy.high,
        "gain_std": runs.gain.std(),
        "gain_ci_low": gain.low,
        "gain_ci_high": gain.high,
        "scratch_acc_mean": runs.test_acc_scratch.mean(),
        "relative_error_reduction": relative_error_reduction(
            accuracy.mean, runs.test_acc_scratch.mean()
        ),
        "val_acc_mean": runs.val_acc.mean(),
        "verdict": verdict(gain) if transfer else "baseline",
    }


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per target x strategy x fraction (see `_cell`), with the effective data
    multiplier read off the same target's scratch curve."""
    paired = pair_with_scratch(results)
    rows = [
        {"target": t, "strategy": s, "fraction": f, **_cell(runs)}
        for (t, s, f), runs in paired.groupby(KEYS, sort=False)
    ]
    table = pd.DataFrame(rows)
    multipliers = []
    for row in table.itertuples():
        if row.strategy == "scratch":
            multipliers.append((float("nan"), ""))
            continue
        scratch = table[(table.target == row.target) & (table.strategy == "scratch")]
        found = effective_data_multiplier(
            row.n_labels, row.test_acc_mean, scratch.n_labels, scratch.test_acc_mean
        )
        multipliers.append((found.value, found.censored))
    table["data_multiplier"], table["data_multiplier_censored"] = zip(*multipliers, strict=True)
    return table.sort_values(["target", "fraction", "strategy"], kind="stable", ignore_index=True)


def _multiplier_text(row: pd.Series) -> str:
    return str(Multiplier(row.data_multiplier, row.data_multiplier_censored))


def summarise_curves(table: pd.DataFrame) -> pd.DataFrame:
    """One row per target x strategy: area under the learning curve (accuracy over log labels),
    its gain over scratch's, and the data multiplier at the fewest and at all labels."""
    rows = []
    for (target, strategy), curve in table.groupby(["target", "strategy"], sort=False):
        curve = curve.sort_values("n_labels")
        scratch = table[(table.target == target) & (table.strategy == "scratch")]
        aulc = area_under_curve(curve.n_labels, curve.test_acc_mean)
        transfer = strategy != "scratch"
        rows.append(
            {
                "target": target,
                "strategy": strategy,
                "aulc": aulc,
                "aulc_gain_vs_scratch": aulc
                - area_under_curve(scratch.n_labels, scratch.test_acc_mean),
                "data_multiplier_at_min_fraction": _multiplier_text(curve.iloc[0])
                if transfer
                else "",
                "data_multiplier_at_max_fraction": _multiplier_text(curve.iloc[-1])
                if transfer
                else "",
            }
        )
    return pd.DataFrame(rows)


VERDICT_COLUMNS = [
    "target",
    "fraction",
    "n_labels",
    "strategy",
    "test_acc_mean",
    "scratch_acc_mean",
    "gain_vs_scratch",
    "gain_ci_low",
    "gain_ci_high",
    "verdict",
]


def pick_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Per target and fraction, the transfer strategy with the best mean validation accuracy
    (never the test split), and what its paired interval says."""
    transfer = table[table.strategy != "scratch"]
    best = transfer.loc[transfer.groupby(["target", "fraction"], sort=False).val_acc_mean.idxmax()]
    return best[VERDICT_COLUMNS].reset_index(drop=True)


def headline_metrics(summary: pd.DataFrame, table: pd.DataFrame) -> dict:
    """For `dvc metrics show`: per target and strategy, the learning-curve area and the gain
    over scratch at the fewest and at all labels."""
    metrics: dict = {}
    for row in summary.itertuples():
        curve = table[(table.target == row.target) & (table.strategy == row.strategy)]
        curve = curve.sort_values("n_labels")
        numbers = {"aulc": round(row.aulc, 6)}
        if row.strategy != "scratch":
            numbers |= {
                "aulc_gain": round(row.aulc_gain_vs_scratch, 6),
                "gain_fewest_labels": round(curve.gain_vs_scratch.iloc[0], 6),
                "gain_all_labels": round(curve.gain_vs_scratch.iloc[-1], 6),
            }
        metrics.setdefault(row.target, {})[row.strategy] = numbers
    return metrics


def compare(params: Params, layout: Layout, recorder: Recorder) -> Comparison:
    reports = layout.reports
    files.check_writable(reports, reports / "plots")
    results = pd.concat(
        [read_results(layout.results(t)) for t in params.targets], ignore_index=True
    )
    table = summarise(results)
    result = Comparison(table, summarise_curves(table), pick_verdicts(table))
    written = {
        "comparison.csv": table.to_csv(index=False),
        "comparison.md": table.to_markdown(index=False, floatfmt=".4f") + "\n",
        "summary.csv": result.summary.to_csv(index=False),
        "verdicts.csv": result.verdicts.to_csv(index=False),
        "report.md": report.render(params, result.verdicts, result.summary),
    }
    for name, text in written.items():
        files.write_text(reports / name, text)
    files.write_json(reports / "metrics.json", headline_metrics(result.summary, table))
    figures = []
    for target in params.targets:
        curves, gain, features_png = (
            reports / "plots" / f"{target}_{kind}.png" for kind in ("curves", "gain", "features")
        )
        plots.learning_curves(table, target, curves)
        plots.gain_heatmap(table, target, gain)
        val = load_split(layout.prepared(target), "val")
        features = load_split(layout.features(target), "val")
        classes = load_meta(layout.prepared(target))["classes"]
        plots.feature_map(val, features, classes, target, features_png)
        figures += [curves, gain, features_png]
    files.prune(reports / "plots", keep={figure.name for figure in figures})
    inputs = [layout.results(t) for t in params.targets]
    with recorder.child("compare", tags={"stage": "compare"}, inputs=inputs) as stage:
        stage.log(metrics={"n_runs": len(results)})
    for name in [*written, "metrics.json"]:
        recorder.log_artifact(reports / name)
    for figure in figures:
        recorder.log_artifact(figure, "plots")
    log.info("comparison written to %s (read %s)", reports, reports / "report.md")
    return result


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, compare, argv)


if __name__ == "__main__":
    main()
