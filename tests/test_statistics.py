"""The comparison's statistics on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.analysis.statistics import (
    GAIN_TOLERANCE,
    HELPS,
    HURTS,
    NO_DIFFERENCE,
    NO_VARIATION,
    Interval,
    Multiplier,
    area_under_curve,
    effective_data_multiplier,
    labels_needed,
    paired_difference,
    pinned_envelope,
    relative_error_reduction,
    snap,
    t_interval,
    verdict,
)


def test_t_interval_matches_the_textbook_value() -> None:
    # mean 2, s = 1, n = 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.std == pytest.approx(1.0)
    assert interval.high - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert interval.low == pytest.approx(4.0 - interval.high)


def test_t_interval_of_one_value_has_no_width() -> None:
    interval = t_interval([0.7])
    assert interval.mean == 0.7 and math.isnan(interval.low) and math.isnan(interval.high)
    assert math.isnan(interval.std)


def test_paired_difference_removes_the_shared_seed_effect() -> None:
    # seeds differ a lot, but transfer is always exactly 0.1 better: a zero-width interval,
    # although in float64 the three differences are not bit-for-bit equal
    scratch = [0.5, 0.7, 0.9]
    transfer = [0.6, 0.8, 1.0]
    assert len({t - s for t, s in zip(transfer, scratch, strict=True)}) > 1
    diff = paired_difference(transfer, scratch)
    assert diff.mean == pytest.approx(0.1)
    assert diff.low == diff.high == diff.mean and diff.std == 0.0
    assert verdict(diff) == NO_VARIATION  # no spread over seeds to test the gain against
    assert t_interval(transfer).low < t_interval(scratch).high  # unpaired, they overlap


def test_snap_zeroes_only_what_is_below_the_tolerance() -> None:
    snapped = snap([1.98e-08, -5e-7, GAIN_TOLERANCE, -2e-6, 0.1])
    assert snapped.tolist() == [0.0, 0.0, GAIN_TOLERANCE, -2e-6, 0.1]
    # one correct answer in a million is a real difference, and it is above the tolerance
    assert GAIN_TOLERANCE <= 1 / 999_999


def test_a_float32_rounding_difference_is_no_gain() -> None:
    # the same accuracies, once as float32 (as training records them) and once as float64
    exact = [0.7, 0.6, 0.9]
    recorded = np.float32(exact).astype(float).tolist()
    assert recorded != exact  # the raw differences are rounding, not zero
    diff = paired_difference(recorded, exact)
    assert (diff.mean, diff.low, diff.high, diff.std) == (0.0, 0.0, 0.0, 0.0)
    assert verdict(diff) == NO_VARIATION
    one_seed = paired_difference(recorded[:1], exact[:1])
    assert one_seed.mean == 0.0 and verdict(one_seed) == NO_DIFFERENCE  # one seed: no claim


def test_differences_one_step_apart_do_vary() -> None:
    # per-seed gains of 0.1 and 0.1 + 1e-6 differ by one example in a million: a real spread
    diff = paired_difference([0.6, 0.6, 0.6 + GAIN_TOLERANCE], [0.5, 0.5, 0.5])
    assert diff.std > 0 and diff.low < diff.mean < diff.high
    assert verdict(diff) == HELPS


def test_verdicts() -> None:
    assert verdict(Interval(0.05, 0.01, 0.09)) == HELPS
    assert verdict(Interval(-0.05, -0.09, -0.01)) == HURTS
    assert verdict(Interval(0.05, -0.01, 0.11)) == NO_DIFFERENCE
    assert verdict(Interval(0.05, math.nan, math.nan)) == NO_DIFFERENCE  # one seed: no claim
    assert verdict(Interval(0.05, 0.05, 0.05, std=0.0)) == NO_VARIATION
    assert verdict(Interval(0.0, 0.0, 0.0, std=0.0)) == NO_VARIATION
    assert verdict(Interval(0.05, 0.01, 0.09, std=0.03)) == HELPS


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


def test_multiplier_on_a_monotone_curve_is_the_plain_interpolation() -> None:
    scratch_n, scratch_acc = [10, 100, 1000], [0.5, 0.7, 0.9]
    # 0.8 is halfway from 0.7 at 100 labels to 0.9 at 1000, in log space: 10**2.5 labels
    above = effective_data_multiplier(10, 0.8, scratch_n, scratch_acc)
    assert above == Multiplier(pytest.approx(10**2.5 / 10), "")
    # 0.6 is halfway from 10 to 100 labels: 10**1.5 labels, against the 1000 used
    below = effective_data_multiplier(1000, 0.6, scratch_n, scratch_acc)
    assert below == Multiplier(pytest.approx(10**1.5 / 1000), "")
    assert pinned_envelope(scratch_n, scratch_acc, 100)[1].tolist() == scratch_acc


def test_multiplier_agrees_with_a_gain_on_a_curve_that_dips() -> None:
    # scratch peaks at 100 labels and drops at 1000; a strategy at 1000 labels beats it by
    # 5.3 points. The raw curve first reaches 0.553 between 10 and 100 labels: under 1x.
    scratch_n, scratch_acc = [10, 100, 1000, 10000], [0.3, 0.7, 0.5, 0.9]
    raw, _ = labels_needed(scratch_n, scratch_acc, 0.553)
    assert raw / 1000 < 1
    # pinned at 1000 the envelope is 0.3, 0.5, 0.5, 0.9: 0.553 is 0.053/0.4 of the way from
    # 1000 to 10000 labels in log space
    assert pinned_envelope(scratch_n, scratch_acc, 1000)[1].tolist() == [0.3, 0.5, 0.5, 0.9]
    found = effective_data_multiplier(1000, 0.553, scratch_n, scratch_acc)
    assert found == Multiplier(pytest.approx(10 ** (0.053 / 0.4)), "") and found.value > 1


def test_an_equal_accuracy_is_one_times_the_labels_even_on_a_flat_envelope() -> None:
    # pinned at 100 the envelope is flat at 0.8: its first crossing of 0.8 is at 10 labels
    scratch_n, scratch_acc = [10, 100], [0.9, 0.8]
    assert labels_needed(*pinned_envelope(scratch_n, scratch_acc, 100), 0.8) == (10, "<")
    for accuracy in (0.8, 0.8 + 2e-8, 0.8 - 2e-8):
        assert effective_data_multiplier(100, accuracy, scratch_n, scratch_acc) == (
            Multiplier(1.0, "")
        )


def test_multiplier_off_the_scratch_budgets_uses_the_running_maximum() -> None:
    labels, envelope = pinned_envelope([10, 100, 1000], [0.6, 0.4, 0.8], 50)
    assert labels.tolist() == [10, 100, 1000] and envelope.tolist() == [0.6, 0.6, 0.8]


def _direction(multiplier: Multiplier) -> int:
    """+1 when scratch needs more labels, -1 fewer, 0 the same; censored by their bound."""
    if multiplier.censored == ">":
        assert multiplier.value >= 1  # a lower bound on a multiplier above 1
        return 1
    if multiplier.censored == "<":
        assert multiplier.value <= 1
        return -1
    return int(np.sign(np.log(multiplier.value)))


def test_multiplier_never_contradicts_the_gain_on_random_curves() -> None:
    rng = np.random.default_rng(20240607)
    for _ in range(500):
        size = int(rng.integers(3, 8))
        budgets = np.sort(rng.choice(np.arange(1, 100_001), size=size, replace=False))
        curve = rng.uniform(0, 1, size=size)
        for n, scratch_here in zip(budgets, curve, strict=True):
            labels, envelope = pinned_envelope(budgets, curve, n)
            assert np.all(np.diff(envelope) >= 0)
            assert envelope[labels == n].tolist() == [scratch_here]  # through scratch at n
            near = scratch_here + rng.choice([-1, 1]) * rng.choice([2e-6, 1e-4, 1e-2])
            for accuracy in (rng.uniform(0, 1), near, scratch_here):
                found = effective_data_multiplier(n, accuracy, budgets, curve)
                gain = float(snap(accuracy - scratch_here))
                assert _direction(found) == np.sign(gain), (budgets, curve, n, accuracy)
