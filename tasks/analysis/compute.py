"""Compute saved: what a transfer run needs to reach what scratch reaches, in optimizer steps
and seconds, with and without the source's pretraining.

For each transfer run and the scratch run of the same target, label budget and seed (the same
labelled subset), the goal is scratch's best validation accuracy. The cost of a run is the
steps (and seconds) of the epochs it trained until its validation accuracy first reached the
goal: scratch reaches it at its best epoch, a transfer run maybe sooner, maybe never. The
compute multiplier is scratch's cost divided by transfer's (above 1: transfer is cheaper).
With pretraining, transfer's seconds also carry the source's pretraining seconds, shared by
the targets fine-tuned from it (amortised); steps are not added there, since pretraining's
steps take batches of another size. Validation only: the test split chooses nothing here.

The linear probe trains no epochs (L-BFGS on frozen features): its cost is its seconds, and it
reaches the goal if its chosen classifier's validation accuracy does. Seconds are measured
(each run's share of its group's training time, by optimizer steps: a group's runs train
together), so they vary between executions; steps do not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

# validation accuracies are exact fractions of the split; this only absorbs float rounding
_TOLERANCE = 1e-12
PAIR_KEYS = ["target", "budget", "seed"]
CELL_KEYS = ["target", "source", "strategy", "budget"]


def epochs_to_reach(curve: list[float], goal: float) -> int | None:
    """How many epochs a run trained until its validation accuracy first reached `goal`
    (1 if after the first); None if it never did."""
    for epoch, accuracy in enumerate(curve):
        if accuracy >= goal - _TOLERANCE:
            return epoch + 1
    return None


def _run_cost(run: pd.Series, goal: float) -> tuple[float, float]:
    """(steps, seconds) of `run` until it reached `goal`; (nan, nan) if it never did. The
    probe's steps are nan (it takes none), its seconds its whole fit."""
    if not run.val_acc_curve:  # the probe
        reached = run.val_acc >= goal - _TOLERANCE
        return math.nan, run.epoch_seconds if reached else math.nan
    epochs = epochs_to_reach(run.val_acc_curve, goal)
    if epochs is None:
        return math.nan, math.nan
    return float(epochs * run.steps_per_epoch), epochs * run.epoch_seconds


def run_costs(
    curves: pd.DataFrame, pretraining: dict[str, dict[str, float]], n_targets: int
) -> pd.DataFrame:
    """One row per transfer run: its cost and scratch's to reach scratch's best validation
    accuracy, and the multipliers. `curves`: the rows of `read_curves` (every target's);
    `pretraining`: each source's data/timings/pretrain/<source>.json (`seconds`)."""
    scratch = curves[curves.strategy == "scratch"].set_index(PAIR_KEYS)
    rows = []
    for run in curves[curves.strategy != "scratch"].itertuples(index=False):
        base = scratch.loc[(run.target, run.budget, run.seed)]
        goal = base.val_acc
        scratch_steps, scratch_seconds = _run_cost(base, goal)
        steps, seconds = _run_cost(pd.Series(run._asdict()), goal)
        shared = pretraining[run.source]["seconds"] / n_targets
        rows.append(
            {
                **{key: getattr(run, key) for key in (*CELL_KEYS, "seed", "n_labels")},
                "goal_val_acc": goal,
                "reached": not math.isnan(seconds),
                "scratch_steps": scratch_steps,
                "scratch_seconds": scratch_seconds,
                "steps": steps,
                "seconds": seconds,
                "multiplier_steps": scratch_steps / steps,
                "multiplier_seconds": scratch_seconds / seconds,
                "multiplier_with_pretraining": scratch_seconds / (seconds + shared),
            }
        )
    return pd.DataFrame(rows)


def _geometric_mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


def compute_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per target x source x transfer strategy x budget: seeds that reached scratch's
    best, mean costs, and the multipliers' geometric means over the seeds that reached it
    (ratios average geometrically: 2x and 0.5x make 1x). `paid_off`: every seed reached it
    and, pretraining included, cost less than scratch."""
    rows = []
    for key, cell in runs.groupby(CELL_KEYS, sort=False):
        reached = cell[cell.reached]
        with_pretraining = _geometric_mean(cell.multiplier_with_pretraining)
        rows.append(
            {
                **dict(zip(CELL_KEYS, key, strict=True)),
                "n_labels": cell.n_labels.iloc[0],
                "seeds_reached": len(reached),
                "n_seeds": len(cell),
                "scratch_steps": cell.scratch_steps.mean(),
                "steps": reached.steps.mean(),
                "scratch_seconds": cell.scratch_seconds.mean(),
                "seconds": reached.seconds.mean(),
                "multiplier_steps": _geometric_mean(cell.multiplier_steps),
                "multiplier_seconds": _geometric_mean(cell.multiplier_seconds),
                "multiplier_with_pretraining": with_pretraining,
                "paid_off": len(reached) == len(cell) and with_pretraining > 1,
            }
        )
    return pd.DataFrame(rows)


def read_curves(
    curves: list[dict[str, Any]], seconds: list[dict[str, Any]], target: str
) -> pd.DataFrame:
    """A target's curves and seconds files (their JSON records) as rows with the target named
    and each result's `epoch_seconds` beside its curve."""
    keys = ["source", "strategy", "budget", "seed"]
    rows = pd.DataFrame(curves).merge(pd.DataFrame(seconds), on=keys, validate="1:1")
    return rows.assign(target=target)
