"""The comparison's statistics on inputs whose answers are known."""

from __future__ import annotations

import math

import pytest

from tasks.analysis.statistics import (
    HELPS,
    HURTS,
    NO_DIFFERENCE,
    Interval,
    area_under_curve,
    effective_data_multiplier,
    labels_needed,
    paired_difference,
    relative_error_reduction,
    t_interval,
    verdict,
)


def test_t_interval_matches_the_textbook_value() -> None:
    # mean 2, s = 1, n = 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.high - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert interval.low == pytest.approx(4.0 - interval.high)


def test_t_interval_of_one_value_has_no_width() -> None:
    interval = t_interval([0.7])
    assert interval.mean == 0.7 and math.isnan(interval.low) and math.isnan(interval.high)


def test_paired_difference_removes_the_shared_seed_effect() -> None:
    # seeds differ a lot, but transfer is always exactly 0.1 better: a zero-width interval
    scratch = [0.5, 0.7, 0.9]
    transfer = [0.6, 0.8, 1.0]
    diff = paired_difference(transfer, scratch)
    assert diff.mean == pytest.approx(0.1)
    assert diff.low == pytest.approx(0.1) and diff.high == pytest.approx(0.1)
    assert verdict(diff) == HELPS
    assert t_interval(transfer).low < t_interval(scratch).high  # unpaired, they overlap


def test_verdicts() -> None:
    assert verdict(Interval(0.05, 0.01, 0.09)) == HELPS
    assert verdict(Interval(-0.05, -0.09, -0.01)) == HURTS
    assert verdict(Interval(0.05, -0.01, 0.11)) == NO_DIFFERENCE
    assert verdict(Interval(0.05, math.nan, math.nan)) == NO_DIFFERENCE  # one seed: no claim


def test_relative_error_reduction() -> None:
    assert relative_error_reduction(0.9, 0.8) == pytest.approx(0.5)  # 20% errors -> 10%
    assert relative_error_reduction(0.7, 0.8) == pytest.approx(-0.5)
    assert relative_error_reduction(1.0, 1.0) == 0.0


def test_area_under_curve_over_log_labels() -> None:
    assert area_under_curve([10, 100, 1000], [0.8, 0.8, 0.8]) == pytest.approx(0.8)
    # linear in log(n) from 0.5 to 0.9: the mean is the midpoint
    assert area_under_curve([1000, 10, 100], [0.9, 0.5, 0.7]) == pytest.approx(0.7)
    assert area_under_curve([50], [0.6]) == 0.6


def test_labels_needed_interpolates_in_log_space() -> None:
    n, censored = labels_needed([10, 1000], [0.5, 0.9], 0.7)
    assert censored == "" and n == pytest.approx(100)  # halfway in log space
    assert labels_needed([10, 1000], [0.5, 0.9], 0.95) == (1000, ">")
    assert labels_needed([10, 1000], [0.5, 0.9], 0.4) == (10, "<")


def test_effective_data_multiplier_exact_and_never_reached() -> None:
    scratch_n, scratch_acc = [10, 100, 1000], [0.5, 0.7, 0.9]
    exact = effective_data_multiplier(10, 0.7, scratch_n, scratch_acc)
    assert exact.value == pytest.approx(10) and exact.censored == ""
    assert str(exact) == "10x"
    never = effective_data_multiplier(100, 0.95, scratch_n, scratch_acc)
    assert never.censored == ">" and never.value == pytest.approx(10)  # more than 1000/100
    assert str(never) == ">10x"
    worse = effective_data_multiplier(100, 0.4, scratch_n, scratch_acc)
    assert worse.censored == "<" and worse.value == pytest.approx(0.1)
