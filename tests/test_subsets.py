"""Label budgets are stratified, nested, paired across strategies, and mean what they say."""

from __future__ import annotations

import numpy as np

from tasks.data.subsets import label_subset, resolve_budgets

Y = np.repeat(np.arange(5), [40, 60, 100, 7, 93])


def budgets(fractions: list[float], shots: list[int] = (), y: np.ndarray = Y) -> dict:
    resolved, _ = resolve_budgets(y, list(fractions), list(shots))
    return {budget.name: budget for budget in resolved}


def test_fractions_are_stratified_with_one_per_class_at_least() -> None:
    few = budgets([0.01])["1%"]
    assert few.per_class == (1, 1, 1, 1, 1)  # ceil(1% of each class), at least one
    subset = label_subset(Y, budgets([0.5])["50%"].per_class, seed=0)
    assert np.bincount(Y[subset], minlength=5).tolist() == [20, 30, 50, 4, 47]


def test_shots_take_that_many_per_class_and_a_small_class_gives_all_it_has() -> None:
    resolved, notes = resolve_budgets(Y, [], [5, 10])
    assert [b.name for b in resolved] == ["5-shot", "10-shot"]
    assert resolved[1].per_class == (10, 10, 10, 7, 10)
    assert resolved[1].per_class_text == "7-10" and resolved[0].per_class_text == "5"
    assert len(notes) == 1 and "10-shot" in notes[0] and "1 classes" in notes[0]


def test_budgets_that_take_the_same_labels_are_merged_with_a_note() -> None:
    y = np.repeat(np.arange(2), 21)  # 42 training examples: 1% and 2% both give 1 per class
    resolved, notes = resolve_budgets(y, [0.01, 0.02, 0.5], [1, 3])
    assert [b.name for b in resolved] == ["1%", "3-shot", "50%"]
    assert [b.n_labels for b in resolved] == [2, 6, 22]
    assert notes == [
        "budgets 1%, 2%, 1-shot all take 2 labels (per class: 1% 1, 2% 1, 1-shot 1): kept as 1%"
    ]


def test_budgets_of_one_label_count_but_other_classes_are_one_point_of_the_curve() -> None:
    y = np.repeat(np.arange(2), [90, 10])  # 10% takes 9 + 1, 5-shot 5 + 5: both 10 labels
    resolved, notes = resolve_budgets(y, [0.1], [5])
    assert [(b.name, b.per_class) for b in resolved] == [("10%", (9, 1))]
    assert notes == [
        "budgets 10%, 5-shot all take 10 labels (per class: 10% 1-9, 5-shot 5): kept as 10%"
    ]


def test_subsets_are_nested_across_budgets_of_both_kinds() -> None:
    # nested wherever one budget takes at least as many as the other in every class
    named = budgets([0.02, 0.5, 1.0], [3])
    for seed in range(3):
        small, shot, medium, full = (
            set(label_subset(Y, named[name].per_class, seed))
            for name in ("2%", "3-shot", "50%", "100%")
        )
        assert small <= shot <= medium <= full
        assert full == set(range(len(Y)))


def test_same_seed_same_subset_other_seed_other_subset() -> None:
    per_class = budgets([0.1])["10%"].per_class
    np.testing.assert_array_equal(label_subset(Y, per_class, 3), label_subset(Y, per_class, 3))
    assert not np.array_equal(label_subset(Y, per_class, 3), label_subset(Y, per_class, 4))
