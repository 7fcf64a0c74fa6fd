"""Stage `compare`: transfer against scratch, with statistics, from the result files alone.

Writes to reports/:
- comparison.csv / .md: one row per target x strategy x label budget (means, intervals, paired
  gains, relative error reduction, effective data multiplier, verdict);
- summary.csv: one row per target x strategy (area under the learning curve, data multipliers);
- verdicts.csv: one row per target x budget (the best transfer arm, source and strategy, chosen
  on validation);
- sources.csv: one row per target x source (its AULC gain, the best source per target);
- transferability.csv: one row per score (Kendall's tau with the gains across pairs);
- compute.csv: one row per target x source x strategy x budget (steps and seconds to reach
  scratch's best validation accuracy, compute multipliers, pretraining amortised);
- report.md with plots/<target>_{curves,gain,features}.png and plots/scores_vs_gain.png, and
  metrics.json for DVC.

A target that failed earlier in the execution (`failed`, from the flow) is listed in the report
with its error, and the others are compared without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.analysis import choice, compute, plots, report
from tasks.analysis.statistics import (
    Multiplier,
    area_under_curve,
    effective_data_multiplier,
    paired_difference,
    points,
    relative_error_reduction,
    t_interval,
    verdict,
)
from tasks.config.params import Params
from tasks.data.datasets import load_meta, load_split, small_validation
from tasks.data.subsets import resolve_budgets
from tasks.frame import stage_command
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)
KEYS = ["target", "source", "strategy", "budget"]  # scratch's source is ""


@dataclass(frozen=True)
class Comparison:
    table: pd.DataFrame  # target x source x strategy x budget
    summary: pd.DataFrame  # target x source x strategy
    verdicts: pd.DataFrame  # target x budget
    sources: pd.DataFrame  # target x source
    agreement: pd.DataFrame  # transferability score
    compute: pd.DataFrame  # target x source x strategy x budget


def read_results(path: Path) -> pd.DataFrame:
    """A results file as written by `finetune`; names stay strings ('NA' is a valid target)."""
    return pd.read_csv(
        path,
        dtype={"target": str, "source": str, "strategy": str, "budget": str, "per_class": str},
        keep_default_na=False,
        na_values={"lr": [""], "l2": [""]},
    )


def read_scores(path: Path) -> pd.DataFrame:
    """A target's transferability scores as `extract` wrote them; names stay strings."""
    return pd.read_csv(
        path,
        dtype={"source": str, "budget": str},
        keep_default_na=False,
        na_values={score: [""] for score in choice.SCORES},
    )


def pair_with_scratch(results: pd.DataFrame) -> pd.DataFrame:
    """Each row beside the scratch run of the same target, budget and seed (same subset)."""
    scratch = results[results.strategy == "scratch"][["target", "budget", "seed", "test_acc"]]
    paired = results.merge(
        scratch,
        on=["target", "budget", "seed"],
        how="left",
        suffixes=("", "_scratch"),
        validate="m:1",
    )
    unpaired = paired[paired.test_acc_scratch.isna()]
    if len(unpaired):
        first = unpaired.iloc[0]
        raise ValueError(
            f"{len(unpaired)} result rows have no scratch run to pair with, e.g. target "
            f"{first.target!r} budget {first.budget} seed {first.seed}"
        )
    return paired


def _cell(runs: pd.DataFrame) -> dict:
    """The statistics of one target x strategy x budget over its seeds."""
    accuracy = t_interval(runs.test_acc)
    gain = paired_difference(runs.test_acc, runs.test_acc_scratch)  # same seed, same subset
    transfer = runs.strategy.iloc[0] != "scratch"
    return {
        "n_labels": runs.n_labels.iloc[0],
        "per_class": runs.per_class.iloc[0],
        "n_seeds": runs.seed.nunique(),
        "test_acc_mean": accuracy.mean,
        "test_acc_std": runs.test_acc.std(),
        "gain_pts": points(gain.mean),
        "test_acc_ci_low": accuracy.low,
        "test_acc_ci_high": accuracy.high,
        "gain_pts_std": points(gain.std),
        "gain_pts_ci_low": points(gain.low),
        "gain_pts_ci_high": points(gain.high),
        "scratch_acc_mean": runs.test_acc_scratch.mean(),
        "relative_error_reduction": relative_error_reduction(
            accuracy.mean, runs.test_acc_scratch.mean()
        ),
        "val_acc_mean": runs.val_acc.mean(),
        "val_loss_mean": runs.val_loss.mean(),
        "verdict": verdict(gain) if transfer else "baseline",
    }


def arm(source: str, strategy: str, several: bool) -> str:
    """How tables and plots name a source's strategy: `source/strategy` among several sources,
    the strategy alone with one, and `scratch`."""
    return f"{source}/{strategy}" if several and source else strategy


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per target x source x strategy x budget (see `_cell`), with the effective data
    multiplier read off the same target's scratch curve."""
    paired = pair_with_scratch(results)
    several = results.source[results.source != ""].nunique() > 1
    rows = [
        {"target": t, "source": src, "strategy": s, "arm": arm(src, s, several), "budget": b}
        | _cell(runs)
        for (t, src, s, b), runs in paired.groupby(KEYS, sort=False)
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
    return table.sort_values(["target", "n_labels"], kind="stable", ignore_index=True)


def _multiplier_text(row: pd.Series) -> str:
    return str(Multiplier(row.data_multiplier, row.data_multiplier_censored))


def summarise_curves(table: pd.DataFrame) -> pd.DataFrame:
    """One row per target x source x strategy: area under the learning curve (accuracy over log
    labels), its gain over scratch's, the data multiplier at the fewest and at all labels, and
    the area under the validation curve (what strategies are chosen on)."""
    rows = []
    arms = table.groupby(["target", "source", "strategy"], sort=False)
    for (target, source, strategy), curve in arms:
        curve = curve.sort_values("n_labels")
        scratch = table[(table.target == target) & (table.strategy == "scratch")]
        aulc = area_under_curve(curve.n_labels, curve.test_acc_mean)
        val_aulc = area_under_curve(curve.n_labels, curve.val_acc_mean)  # for choosing
        transfer = strategy != "scratch"
        rows.append(
            {
                "target": target,
                "source": source,
                "strategy": strategy,
                "arm": curve.arm.iloc[0],
                "aulc": aulc,
                "aulc_gain_pts": points(
                    aulc - area_under_curve(scratch.n_labels, scratch.test_acc_mean)
                ),
                "data_multiplier_at_fewest_labels": _multiplier_text(curve.iloc[0])
                if transfer
                else "",
                "data_multiplier_at_most_labels": _multiplier_text(curve.iloc[-1])
                if transfer
                else "",
                "val_aulc": val_aulc,
            }
        )
    return pd.DataFrame(rows)


VERDICT_COLUMNS = [
    "target",
    "budget",
    "n_labels",
    "per_class",
    "source",
    "strategy",
    "arm",
    "test_acc_mean",
    "scratch_acc_mean",
    "gain_pts",
    "gain_pts_ci_low",
    "gain_pts_ci_high",
    "verdict",
]


def pick_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Per target and budget, the transfer arm (a source's strategy) with the best mean
    validation accuracy
    (never the test split), ties to the lower mean validation loss, then to the simpler strategy
    (choice.SIMPLICITY); and what its paired interval says."""
    ranked = choice.transfer_rows(table).sort_values(
        ["val_acc_mean", "val_loss_mean", "simplicity"],
        ascending=[False, True, True],
        kind="stable",
    )
    best = ranked.groupby(["target", "budget"], sort=False).head(1)
    best = best.sort_values(["target", "n_labels"], kind="stable")
    return best[VERDICT_COLUMNS].reset_index(drop=True)


@dataclass(frozen=True)
class Headline:
    """One target's answer in a few numbers, for `dvc metrics show` and the MLflow parent run.
    Every choice in it is made on validation: the strategy with the best validation AULC (ties
    to the simpler), and at each end of the curve the verdict table's strategy."""

    best_strategy: str  # the arm: `source/strategy` among several sources
    aulc_gain_pts: float  # the best strategy's
    fewest: pd.Series  # the verdict row at the fewest labels
    most: pd.Series  # ...and at the most

    def metrics(self) -> dict[str, float]:
        return {
            "aulc_gain_pts": self.aulc_gain_pts,
            "gain_pts_fewest_labels": self.fewest.gain_pts,
            "gain_pts_most_labels": self.most.gain_pts,
        }

    def texts(self) -> dict[str, str]:
        return {
            "best_strategy": self.best_strategy,
            "fewest_labels": f"{self.fewest.budget}: {self.fewest.verdict} "
            f"({self.fewest.arm}, {self.fewest.gain_pts:+.1f} points)",
        }


def headlines(summary: pd.DataFrame, verdicts: pd.DataFrame) -> dict[str, Headline]:
    found = {}
    for target, curves in choice.transfer_rows(summary).groupby("target", sort=False):
        best = curves.sort_values(["val_aulc", "simplicity"], ascending=[False, True]).iloc[0]
        ends = verdicts[verdicts.target == target].sort_values("n_labels", kind="stable")
        found[target] = Headline(best.arm, best.aulc_gain_pts, ends.iloc[0], ends.iloc[-1])
    return found


def record_headlines(recorder: Recorder, found: dict[str, Headline]) -> None:
    """The execution's answer on its parent record, so that executions compare at the level
    where a user starts: `<target>/aulc_gain_pts` and the like, with the best strategy and the
    verdict at the fewest labels as params."""
    recorder.log(
        params={f"{t}/{k}": v for t, h in found.items() for k, v in h.texts().items()},
        metrics={f"{t}/{k}": v for t, h in found.items() for k, v in h.metrics().items()},
    )


def recorded_headlines(reports: Path) -> dict[str, Headline]:
    """The headlines of the comparison on disk, for an execution that found it up to date."""
    summary = pd.read_csv(
        reports / "summary.csv",
        dtype={"target": str, "source": str, "strategy": str, "arm": str},
        keep_default_na=False,
    )
    return headlines(summary, report.read_verdicts(reports / "verdicts.csv"))


def headline_metrics(found: dict[str, Headline]) -> dict[str, dict[str, float]]:
    """reports/metrics.json: three numbers per target, rounded as recorded."""
    return {t: {k: round(v, 6) for k, v in h.metrics().items()} for t, h in found.items()}


def compare(
    params: Params, layout: Layout, recorder: Recorder, failed: dict[str, str] | None = None
) -> Comparison:
    """Compare the targets that finished; `failed` names the others with their errors (the flow
    passes them; a stage command runs only when every target finished)."""
    failed = failed or {}
    reports = layout.reports
    files.check_writable(reports, reports / "plots")
    targets = [t for t in params.targets if t not in failed]
    if not targets:
        raise ValueError(f"no target finished, nothing to compare: {failed}")
    results = pd.concat([read_results(layout.results(t)) for t in targets], ignore_index=True)
    table = summarise(results)
    sources = choice.source_matrix(choice.aulc_gains(results))
    scores = pd.concat(
        [read_scores(layout.scores(t)).assign(target=t) for t in targets], ignore_index=True
    )
    result = Comparison(
        table,
        summarise_curves(table),
        pick_verdicts(table),
        sources,
        choice.score_agreement(sources, scores),
        _compute(params, targets, layout),
    )
    context = report.Context(
        execution=recorder.identity(),
        params_origin=params.origin,
        datasets=report.describe_datasets(params, layout),
        notes={t: _data_notes(params, t, layout) for t in targets},
        failed=failed,
    )
    written = {
        "comparison.csv": table.to_csv(index=False),
        "comparison.md": table.to_markdown(index=False, floatfmt=".4f") + "\n",
        "summary.csv": result.summary.to_csv(index=False),
        "verdicts.csv": result.verdicts.to_csv(index=False),
        "sources.csv": result.sources.to_csv(index=False),
        "transferability.csv": result.agreement.to_csv(index=False),
        "compute.csv": result.compute.to_csv(index=False),
        "report.md": report.render(params, targets, result, context),
    }
    for name, text in written.items():
        files.write_text(reports / name, text)
    found = headlines(result.summary, result.verdicts)
    files.write_json(reports / "metrics.json", headline_metrics(found))
    figures = [reports / "plots" / "scores_vs_gain.png"]
    plots.scores_vs_gain(sources, choice.pair_scores(scores), result.agreement, figures[0])
    for target in targets:
        curves, gain, features_png = (
            reports / "plots" / f"{target}_{kind}.png" for kind in ("curves", "gain", "features")
        )
        plots.learning_curves(table, target, curves)
        plots.gain_heatmap(table, target, gain)
        val = load_split(layout.prepared(target), "val")
        best = sources[(sources.target == target) & sources.best].source.iloc[0]
        features = load_split(layout.features(target, best), "val")
        classes = load_meta(layout.prepared(target))["classes"]
        plots.feature_map(val, features, classes, target, features_png)
        figures += [curves, gain, features_png]
    files.prune(reports / "plots", keep={figure.name for figure in figures})
    written["report.html"] = report.render_html(written["report.md"], reports)
    files.write_text(reports / "report.html", written["report.html"])
    inputs = [layout.results(t) for t in targets]
    with recorder.child("compare", tags=stage_tags("compare"), inputs=inputs) as stage:
        stage.log(metrics={"n_runs": len(results)}, tags={"failed_targets": ",".join(failed)})
    record_headlines(recorder, found)
    for name in [*written, "metrics.json"]:
        recorder.log_artifact(reports / name)
    for figure in figures:
        recorder.log_artifact(figure, "plots")
    log.info("comparison written to %s (read %s)", reports, reports / "report.md")
    return result


def _compute(params: Params, targets: list[str], layout: Layout) -> pd.DataFrame:
    """The compute table from the targets' curves and each source's pretraining cost, shared
    by every target of the study."""

    def read(path: Path) -> list[dict]:
        return json.loads(path.read_text())

    curves = pd.concat(
        [
            compute.read_curves(read(layout.curves(t)), read(layout.finetune_seconds(t)), t)
            for t in targets
        ],
        ignore_index=True,
    )
    pretraining = {s: read(layout.pretrain_seconds(s)) for s in params.sources}
    runs = compute.run_costs(curves, pretraining, n_targets=len(params.targets))
    return compute.compute_table(runs)


def _data_notes(params: Params, target: str, layout: Layout) -> list[str]:
    """What the reader of a target's numbers must know about its data: merged or capped label
    budgets, and a validation split too small for the choices made on it."""
    prepared = layout.prepared(target)
    meta = load_meta(prepared)
    cfg = params.finetune
    _, notes = resolve_budgets(load_split(prepared, "train").y, cfg.fractions, cfg.shots)
    if note := small_validation(meta["val_class_counts"]):
        notes.append(note)
    return notes


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, compare, argv)


if __name__ == "__main__":
    main()
