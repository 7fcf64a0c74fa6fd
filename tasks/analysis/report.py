"""reports/report.md: the study's answer, readable on its own (tables, figures, method)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.analysis.statistics import CONFIDENCE
from tasks.config.params import Params


def _points(value: float) -> str:
    return f"{value * 100:+.1f}"


def _interval(low: float, high: float) -> str:
    if pd.isna(low):
        return "n/a (one seed)"
    return f"[{_points(low)}, {_points(high)}]"


def read_verdicts(path: Path) -> pd.DataFrame:
    """reports/verdicts.csv as `compare` wrote it (target names stay strings)."""
    return pd.read_csv(
        path,
        dtype={"target": str, "strategy": str, "verdict": str},
        keep_default_na=False,
        na_values={"gain_ci_low": [""], "gain_ci_high": [""]},
    )


def verdict_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as people read it: per target and label budget, the transfer strategy
    with the best validation accuracy, its paired gain over scratch and what the interval says."""
    return pd.DataFrame(
        {
            "target": verdicts.target,
            "fraction": verdicts.fraction.map("{:g}".format),
            "labels": verdicts.n_labels,
            "best transfer (on val)": verdicts.strategy,
            "test acc": verdicts.test_acc_mean.map("{:.3f}".format),
            "scratch": verdicts.scratch_acc_mean.map("{:.3f}".format),
            "gain, points": verdicts.gain_vs_scratch.map(_points),
            f"{CONFIDENCE:.0%} CI": [
                _interval(lo, hi)
                for lo, hi in zip(verdicts.gain_ci_low, verdicts.gain_ci_high, strict=True)
            ],
            "verdict": verdicts.verdict,
        }
    )


def summary_markdown(summary: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "target": summary.target,
            "strategy": summary.strategy,
            "AULC": summary.aulc.map("{:.3f}".format),
            "AULC gain, points": summary.aulc_gain_vs_scratch.map(_points),
            "data multiplier, fewest labels": summary.data_multiplier_at_min_fraction,
            "data multiplier, all labels": summary.data_multiplier_at_max_fraction,
        }
    )
    return shown.to_markdown(index=False, disable_numparse=True)


def render(params: Params, verdicts: pd.DataFrame, summary: pd.DataFrame) -> str:
    cfg = params.finetune
    source = params.source
    lines = [
        "# Does pretraining on the source help the targets?",
        "",
        f"Source: `{source.kind}`"
        + (f", classes {source.classes}" if source.classes else "")
        + f". Targets: {', '.join(f'`{t}`' for t in params.targets)}.",
        "",
        "## Verdict",
        "",
        "Transfer **helps** where the whole paired 95% interval of (transfer - scratch) lies",
        "above zero, **hurts** (negative transfer) where it lies below, and otherwise makes **no",
        "significant difference**. The strategy shown is the one with the best mean",
        "*validation* accuracy, so the test split chooses nothing here either.",
        "",
        verdict_table(verdicts).to_markdown(index=False, disable_numparse=True),
        "",
        "## Learning-curve summary",
        "",
        "AULC: mean test accuracy over log(labels) (trapezoid area / log range). Data",
        "multiplier (Hernandez et al. 2021): how many times more labels scratch needs to match",
        "the strategy, read off scratch's interpolated learning curve; `>` means scratch never",
        "gets there within the largest budget, `<` that scratch is already there at the smallest.",
        "",
        summary_markdown(summary),
        "",
    ]
    for target in params.targets:
        lines += [
            f"## {target}",
            "",
            f"![learning curves](plots/{target}_curves.png)",
            f"![gain over scratch](plots/{target}_gain.png)",
            "",
            f"![features vs raw inputs](plots/{target}_features.png)",
            "",
        ]
    lines += [
        "## Method",
        "",
        f"- **Splits.** Each dataset is cut once into stratified train / val / test "
        f"({1 - params.split.val - params.split.test:.0%} / {params.split.val:.0%} / "
        f"{params.split.test:.0%}, seed {params.split.seed}), unless it ships its own test "
        "arrays.",
        f"- **Label budgets.** Fractions {cfg.fractions} of each target's training split; "
        "subsets are stratified (at least one example per class) and nested (a larger fraction "
        "contains the smaller ones).",
        f"- **Seeds.** {cfg.seeds}: a seed fixes the label subset, the init and the data order. "
        "The same seed gives every strategy the same subset, so differences are paired.",
        "- **Strategies.** `scratch`: random init, same architecture. `linear_probe`: "
        "L2-regularised logistic regression on the frozen features (L-BFGS). `finetune`: all "
        f"layers from the pretrained weights, the backbone at {cfg.backbone_lr_scale:g} x the "
        "head's learning rate. `lp_ft`: the probe's solution as the head, then `finetune` "
        f"(Kumar et al. 2022). `partial`: `finetune` with the first {cfg.freeze_blocks} "
        "backbone block(s) frozen.",
        f"- **Tuning budget.** Every network strategy, scratch included, tries learning rates "
        f"{cfg.lrs} with Adam, early stopping on validation accuracy (patience "
        f"{cfg.patience}, at most {cfg.max_epochs} epochs); the probe tries L2 strengths "
        f"{cfg.probe_l2}. Choices use the validation split only; the test split is scored "
        "once per run, after them.",
        f"- **Statistics.** Means over seeds with {CONFIDENCE:.0%} Student-t intervals; the gain "
        "is the mean of per-seed differences to scratch with its paired t-interval; relative "
        "error reduction = (scratch error - strategy error) / scratch error.",
        "",
    ]
    return "\n".join(lines)
