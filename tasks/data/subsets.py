"""Label budgets: how many training labels a run may see, and which ones at a given seed.

A budget is a fraction of a target's training split (`finetune.fractions`) or a number of labels
per class (`finetune.shots`, the few-shot convention). Both take, in every class, a prefix of one
seeded permutation of that class: a budget's subset contains every budget's that takes no more in
any class (5% contains 2%, 10-shot contains 5-shot), and it is the same for every strategy at a
seed, which makes their comparison paired. A learning curve has one point per label count, so
budgets that take the same number of labels are merged (`resolve_budgets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Budget:
    """One label budget of a target, resolved against its training labels."""

    name: str  # "1%" for the fraction 0.01, "5-shot" for 5 labels per class
    per_class: tuple[int, ...]  # labels taken from each class, in class order

    @property
    def n_labels(self) -> int:
        return sum(self.per_class)

    @property
    def per_class_text(self) -> str:
        """"5", or "1-3" when classes of different sizes take different counts."""
        low, high = min(self.per_class), max(self.per_class)
        return str(low) if low == high else f"{low}-{high}"


def fraction_name(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def shots_name(shots: int) -> str:
    return f"{shots}-shot"


def _fraction_counts(class_sizes: np.ndarray, fraction: float) -> tuple[int, ...]:
    # round() first: 0.07 * 100 is 7.000000000000001, and ceil would make it 8
    return tuple(max(1, math.ceil(round(fraction * n, 9))) for n in class_sizes.tolist())


def resolve_budgets(
    y: np.ndarray, fractions: list[float], shots: list[int]
) -> tuple[list[Budget], list[str]]:
    """The distinct budgets of a training split with labels `y` (N,), fewest labels first, and
    a line for each merge or cap. Budgets that take the same number of labels are one budget,
    the first listed (fractions before shots): the same subsets when they take the same labels
    in every class, else a second point at the same label count, which no learning curve can
    hold. Shots beyond a class's size take the whole class."""
    sizes = np.bincount(y)  # (K,) training examples per class
    asked = [(fraction_name(f), _fraction_counts(sizes, f)) for f in fractions]
    notes = []
    for k in shots:
        counts = tuple(min(k, n) for n in sizes.tolist())
        if k > sizes.min():
            notes.append(
                f"{shots_name(k)}: {int((sizes < k).sum())} classes have fewer than {k} training "
                f"examples (the smallest {sizes.min()}); they give all they have"
            )
        asked.append((shots_name(k), counts))
    kept: dict[int, list[Budget]] = {}  # label count -> the budgets that take it
    for name, counts in asked:
        kept.setdefault(sum(counts), []).append(Budget(name, counts))
    for n_labels, same in kept.items():
        if len(same) > 1:
            per_class = ", ".join(f"{b.name} {b.per_class_text}" for b in same)
            notes.append(
                f"budgets {', '.join(b.name for b in same)} all take {n_labels} labels (per "
                f"class: {per_class}): kept as {same[0].name}"
            )
    return [kept[n][0] for n in sorted(kept)], notes


def label_subset(y: np.ndarray, per_class: tuple[int, ...], seed: int) -> np.ndarray:
    """Indices of `per_class[k]` examples of each class k of `y` (N,), sorted: a prefix of a
    permutation that depends on the seed and the class only."""
    chosen = []
    for label, count in enumerate(per_class):
        members = np.flatnonzero(y == label)
        order = np.random.default_rng([seed, label]).permutation(members)
        chosen.append(order[:count])
    return np.sort(np.concatenate(chosen))
