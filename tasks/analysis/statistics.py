"""The statistics of the comparison: intervals over seeds, paired differences, learning-curve
area, effective data multiplier and the verdict. Plain functions on numbers, tested on inputs
whose answers are known (tests/test_statistics.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

CONFIDENCE = 0.95
HELPS, NO_DIFFERENCE, HURTS = "helps", "no significant difference", "hurts"
NO_VARIATION = "no variation across seeds"
# Accuracies are ratios of counts over one test set: below a million test examples two that
# differ at all differ by at least 1e-6, so anything smaller is float32 rounding, not a gain.
GAIN_TOLERANCE = 1e-6


def points(fraction: float) -> float:
    """An accuracy difference in percentage points: the one unit of every gain we report (CSV,
    MLflow, metrics.json, report); accuracies themselves stay fractions."""
    return fraction * 100


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # NaN when there are fewer than two values
    high: float
    # sample standard deviation of the values; NaN when unknown (fewer than two values, or an
    # interval built by hand), exactly 0.0 when paired differences do not vary across seeds
    std: float = math.nan


def snap(values: ArrayLike) -> np.ndarray:
    """`values` as floats, with those within GAIN_TOLERANCE of zero set to exactly 0.0: for
    accuracy differences, a gain that is only float rounding becomes no gain."""
    values = np.asarray(values, dtype=float)
    return np.where(np.abs(values) < GAIN_TOLERANCE, 0.0, values)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval for the mean: mean ± t(n-1) * s / sqrt(n)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan)
    std = float(values.std(ddof=1))
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, std)


def paired_difference(
    ours: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
) -> Interval:
    """t-interval of the per-seed differences ours - baseline (same seed, same label subset).

    Each difference is snapped to 0.0 within GAIN_TOLERANCE. Differences that agree within
    GAIN_TOLERANCE are one difference seen through rounding, so they give a zero-width interval
    with std exactly 0.0, which `verdict` reads as NO_VARIATION.
    """
    differences = snap(np.asarray(ours, float) - np.asarray(baseline, float))
    if len(differences) >= 2 and np.ptp(differences) < GAIN_TOLERANCE:
        mean = float(differences.mean())
        return Interval(mean, mean, mean, 0.0)
    return t_interval(differences, confidence)


def relative_error_reduction(accuracy: float, baseline_accuracy: float) -> float:
    """Share of the baseline's errors that are gone: 0.5 means half the mistakes."""
    baseline_error = 1 - baseline_accuracy
    if baseline_error == 0:
        return 0.0 if accuracy == 1 else -math.inf
    return (baseline_error - (1 - accuracy)) / baseline_error


def verdict(difference: Interval) -> str:
    """Helps when the whole interval is above zero, hurts when it is below, else no difference.

    A paired difference that is the same on every seed (std 0.0, two seeds or more) has no
    spread to test against, so it is NO_VARIATION rather than a significant gain or loss. One
    seed (NaN bounds) supports no claim: NO_DIFFERENCE.
    """
    if difference.std == 0:
        return NO_VARIATION
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
    is there already at the smallest n. Meant for a non-decreasing curve, where the first
    crossing is the only one (see `pinned_envelope`).
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


def pinned_envelope(
    n_labels: Sequence[float], accuracy: Sequence[float], at: float
) -> tuple[np.ndarray, np.ndarray]:
    """A non-decreasing envelope of the curve that passes through its point at `at`.

    Returns (labels, envelope) sorted by labels. For n' >= at the envelope is the running
    maximum of the curve from `at` to n'; for n' < at, the running minimum over [n', at]. It
    equals the curve wherever the curve is already monotone. When `at` is not one of the
    labels, there is no point to pin: the plain running maximum from the fewest labels.
    """
    order = np.argsort(n_labels)
    n, y = np.asarray(n_labels, float)[order], np.asarray(accuracy, float)[order]
    pinned = np.flatnonzero(n == at)
    if len(pinned) == 0:
        return n, np.maximum.accumulate(y)
    i = pinned[0]
    above = np.maximum.accumulate(y[i:])
    below = np.minimum.accumulate(y[: i + 1][::-1])[::-1]  # min over [n', at], read leftwards
    return n, np.concatenate([below[:-1], above])


def effective_data_multiplier(
    n_labels: float,
    accuracy: float,
    scratch_labels: Sequence[float],
    scratch_accuracy: Sequence[float],
) -> Multiplier:
    """How many times more labels scratch needs to match `accuracy` reached with `n_labels`
    (Hernandez et al. 2021).

    Read off scratch's learning curve (linear in log labels) through `pinned_envelope` at
    `n_labels`, so that the multiplier never contradicts the gain at the same budget: when
    scratch's curve is not monotone, the first crossing of the raw curve can sit below
    `n_labels` for a strategy that beats scratch there. Above `n_labels` the envelope is
    scratch's best accuracy so far, below it scratch's worst accuracy from there up to
    `n_labels`; it is scratch's own curve wherever that is monotone. A gain (accuracy minus
    scratch's at `n_labels`) above zero gives a multiplier above 1 (or ">"), one below zero
    gives below 1 (or "<"), and one within GAIN_TOLERANCE exactly 1.

    `n_labels` should be one of `scratch_labels` (the same budgets); if it is not, the
    envelope is the running maximum of scratch's curve, and the sign guarantee does not hold.
    """
    labels, envelope = pinned_envelope(scratch_labels, scratch_accuracy, n_labels)
    pinned = np.flatnonzero(labels == n_labels)
    # a flat envelope would put an equal accuracy's first crossing below n_labels
    if len(pinned) and abs(accuracy - envelope[pinned[0]]) < GAIN_TOLERANCE:
        return Multiplier(1.0, "")
    needed, censored = labels_needed(labels, envelope, accuracy)
    return Multiplier(needed / n_labels, censored)
