"""Label budgets are stratified, nested across fractions, and paired across strategies."""

from __future__ import annotations

import numpy as np

from tasks.data.subsets import label_subset

Y = np.repeat(np.arange(5), [40, 60, 100, 7, 93])


def test_subset_is_stratified_with_one_per_class_at_least() -> None:
    subset = label_subset(Y, 0.01, seed=0)
    counts = np.bincount(Y[subset], minlength=5)
    assert counts.min() >= 1
    assert counts.tolist() == [1, 1, 1, 1, 1]  # ceil(1% of each class)
    half = np.bincount(Y[label_subset(Y, 0.5, seed=0)], minlength=5)
    assert half.tolist() == [20, 30, 50, 4, 47]


def test_subsets_are_nested_across_fractions() -> None:
    for seed in range(3):
        small, medium, full = (set(label_subset(Y, f, seed)) for f in (0.02, 0.1, 1.0))
        assert small <= medium <= full
        assert full == set(range(len(Y)))


def test_same_seed_same_subset_other_seed_other_subset() -> None:
    np.testing.assert_array_equal(label_subset(Y, 0.1, 3), label_subset(Y, 0.1, 3))
    assert not np.array_equal(label_subset(Y, 0.1, 3), label_subset(Y, 0.1, 4))
