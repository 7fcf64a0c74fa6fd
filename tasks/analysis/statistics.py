"""The statistics of the comparison: intervals over seeds, paired differences, learning-curve
area, effective data multiplier and the verdict. Plain functions on numbers, tested on inputs
whose answers are known (tests/test_statistics.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
HELPS, NO_DIFFERENCE, HURTS = "helps", "no significant difference", "hurts"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # NaN when there are fewer than two values
    high: float


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval for the mean: mean ± t(n-1) * s / sqrt(n)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan)
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1)
    half /= math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def paired_difference(
    ours: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
) -> Interval:
    """t-interval of the per-seed differences ours - baseline (same seed, same label subset)."""
    return t_interval(np.asarray(ours, float) - np.asarray(baseline, float), confidence)


def relative_error_reduction(accuracy: float, baseline_accuracy: float) -> float:
    """Share of the baseline's errors that are gone: 0.5 means half the mistakes."""
    baseline_error = 1 - baseline_accuracy
    if baseline_error == 0:
        return 0.0 if accuracy == 1 else -math.inf
    return (baseline_error - (1 - accuracy)) / baseline_error


def verdict(difference: Interval) -> str:
    """Helps when the whole interval is above zero, hurts when it is below, else no difference."""
    if difference.low > 0:
        return HELPS
    if difference.high < 0:
        return HURTS
    return NO_DIFFERENCE


def area_under_curve(n_labels: Sequence[float], accuracy: Sequence[float]) -> float:
    """Mean accuracy over log(labels): the trapezoid area divided by the log range, so a flat
    curve at 0.8 scores 0.8. A single point scores its accuracy."""
    order = np.argsort(n_labels)
    x, y = np.log(np.asarray(n_labels, float)[order]), np.asarray(accuracy, float)[order]
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


@dataclass(frozen=True)
class Multiplier:
    value: float
    # "": exact; ">": scratch never got there (value is a lower bound); "<": an upper bound
    censored: str

    def __str__(self) -> str:
        return f"{self.censored}{self.value:.3g}x"


def labels_needed(
    n_labels: Sequence[float], accuracy: Sequence[float], wanted: float
) -> tuple[float, str]:
    """Labels at which the curve first reaches `wanted`, interpolating linearly in log(labels).

    Returns (n, "") when it does; (largest n, ">") when it never does; (smallest n, "<") when it
    is there already at the smallest n.
    """
    order = np.argsort(n_labels)
    n, y = np.asarray(n_labels, float)[order], np.asarray(accuracy, float)[order]
    if y[0] >= wanted:
        return float(n[0]), "<"
    x = np.log(n)
    for i in range(1, len(x)):
        if y[i] >= wanted:
            t = (wanted - y[i - 1]) / (y[i] - y[i - 1])
            return float(np.exp(x[i - 1] + t * (x[i] - x[i - 1]))), ""
    return float(n[-1]), ">"


def effective_data_multiplier(
    n_labels: float,
    accuracy: float,
    scratch_labels: Sequence[float],
    scratch_accuracy: Sequence[float],
) -> Multiplier:
    """How many times more labels scratch needs to match `accuracy` reached with `n_labels`
    (Hernandez et al. 2021), read off scratch's interpolated learning curve."""
    needed, censored = labels_needed(scratch_labels, scratch_accuracy, accuracy)
    return Multiplier(needed / n_labels, censored)
