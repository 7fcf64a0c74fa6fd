"""Label budgets: which training examples a run may see at a given fraction and seed."""

from __future__ import annotations

import math

import numpy as np


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified `fraction` of `y`, at least one example per class, sorted.

    Each class is ordered by a permutation that depends on the seed and the class only, and the
    subset takes a prefix of it: so subsets are nested across fractions (5% contains 2%) and
    identical across strategies for the same seed, which makes their comparison paired.
    """
    chosen = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        order = np.random.default_rng([seed, int(label)]).permutation(members)
        # round() first: 0.07 * 100 is 7.000000000000001, and ceil would make it 8
        chosen.append(order[: max(1, math.ceil(round(fraction * len(members), 9)))])
    return np.sort(np.concatenate(chosen))
