"""Labelled arrays, class subsets, stratified splits, and the prepared-split file format that
every later stage reads: `<dir>/{train,val,test}.npz` with `x` (N, C, L) float32 and `y` (N,)
int64 labels in 0..K-1, plus `<dir>/meta.json`. The source has no test.npz unless it ships test
arrays (pretraining uses train and val only). Where the data comes from: tasks/data/sources.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.workspace import files

SPLITS = ("train", "val", "test")
# Fewer validation examples than this in a class make choices made on validation (early stopping,
# learning rate, probe strength) noisy: `prepare` warns, and the report can say so.
MIN_VAL_PER_CLASS = 5


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the problem."""


@dataclass(frozen=True)
class Labelled:
    x: np.ndarray  # (N, C, L) float32
    y: np.ndarray  # (N,) int64 class indices; before `keep_classes`, the labels as stored

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Labelled:
        return Labelled(self.x[index], self.y[index])


@dataclass(frozen=True)
class RawDataset:
    pool: Labelled  # everything that is not a given test set; y: the labels as stored
    test: Labelled | None  # the dataset's own test set, when it ships one


def keep_classes(data: Labelled, classes: Sequence[int | str], where: str) -> Labelled:
    """Keep the listed classes and relabel them 0..K-1 in the listed order.

    `data.y` holds labels as stored (ints or strings); they are matched to `classes` by their
    text, so that a test set stored as '1' meets a training set stored as 1."""
    index = {str(label): i for i, label in enumerate(classes)}
    stored, inverse = np.unique(data.y.astype(str), return_inverse=True)  # (U,), (N,)
    present = set(stored.tolist())
    missing = [label for label in classes if str(label) not in present]
    if missing:
        raise DataError(f"{where}: classes {missing} have no examples")
    # look each distinct label up once, then spread the codes over the examples
    codes = np.array([index.get(label, -1) for label in stored.tolist()], dtype=np.int64)
    relabelled = codes[inverse.reshape(-1)]  # (N,) class index, -1 where not kept
    kept = np.flatnonzero(relabelled >= 0)
    return Labelled(data.x[kept], relabelled[kept])


def small_validation(val_counts: list[int]) -> str | None:
    """A warning when a validation split (`val_counts`: examples per class) is too small for the
    choices made on it, else None."""
    if min(val_counts) >= MIN_VAL_PER_CLASS:
        return None
    small = sum(count < MIN_VAL_PER_CLASS for count in val_counts)
    return (
        f"the validation split has fewer than {MIN_VAL_PER_CLASS} examples in {small} of "
        f"{len(val_counts)} classes (fewest {min(val_counts)}): the choices made on it (learning "
        "rate, L2 strength, early stopping, the best strategy) are noisy"
    )


def class_counts(data: Labelled, num_classes: int) -> list[int]:
    """Examples per class index 0..K-1 (zeros included)."""
    return np.bincount(data.y, minlength=num_classes).tolist()


def stratified_split(
    y: np.ndarray,
    fractions: dict[str, float],
    seed: int,
    where: str,
    names: Sequence[int | str] | None = None,
) -> dict[str, np.ndarray]:
    """Cut every class by the same fractions; the rest goes to 'train'. Indices are sorted.

    `names`: the original label of each class index, for messages (default: the index)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in [*fractions, "train"]}
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shown = label if names is None else names[int(label)]
        needed = len(fractions) + 1
        if len(members) < needed:
            raise DataError(
                f"{where}: class {shown} has {len(members)} examples; a split into "
                f"{', '.join(parts)} needs at least {needed}"
            )
        counts = {name: max(1, round(f * len(members))) for name, f in fractions.items()}
        if sum(counts.values()) >= len(members):
            raise DataError(
                f"{where}: class {shown} has {len(members)} examples, too few to leave any for "
                f"training after {', '.join(f'{n} {c}' for n, c in counts.items())}"
            )
        start = 0
        for name, count in counts.items():
            parts[name].append(members[start : start + count])
            start += count
        parts["train"].append(members[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def save_splits(directory: Path, splits: dict[str, Labelled], meta: dict) -> None:
    for name, data in splits.items():
        files.write_npz(directory / f"{name}.npz", x=data.x, y=data.y)
    files.write_json(directory / "meta.json", meta)


def load_split(directory: Path, name: str) -> Labelled:
    with np.load(directory / f"{name}.npz", allow_pickle=False) as archive:
        return Labelled(archive["x"], archive["y"])


def load_meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())
