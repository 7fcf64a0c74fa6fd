"""Labelled arrays, class subsets, stratified splits, and the prepared-split file format that
every later stage reads: `<dir>/{train,val,test}.npz` with `x` (N, C, L) float32 and `y` (N,)
int64 labels in 0..K-1, plus `<dir>/meta.json`. Where the data comes from: tasks/data/sources.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.workspace import files

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the problem."""


@dataclass(frozen=True)
class Labelled:
    x: np.ndarray  # (N, C, L) float32
    y: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Labelled:
        return Labelled(self.x[index], self.y[index])


def keep_classes(data: Labelled, classes: list[int], where: str) -> Labelled:
    """Keep the listed classes and relabel them 0..K-1 in the listed order."""
    missing = sorted(set(classes) - set(np.unique(data.y).tolist()))
    if missing:
        raise DataError(f"{where}: classes {missing} have no examples")
    relabel = np.full(max(int(data.y.max()), *classes) + 1, -1, dtype=np.int64)
    relabel[np.asarray(classes)] = np.arange(len(classes))
    kept = data.take(np.flatnonzero(relabel[data.y] >= 0))
    return Labelled(kept.x, relabel[kept.y])


def stratified_split(
    y: np.ndarray, fractions: dict[str, float], seed: int, where: str
) -> dict[str, np.ndarray]:
    """Cut every class by the same fractions; the rest goes to 'train'. Indices are sorted."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in [*fractions, "train"]}
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        needed = len(fractions) + 1
        if len(members) < needed:
            raise DataError(
                f"{where}: class {label} has {len(members)} examples; a split into "
                f"{', '.join(parts)} needs at least {needed}"
            )
        counts = {name: max(1, round(f * len(members))) for name, f in fractions.items()}
        if sum(counts.values()) >= len(members):
            raise DataError(
                f"{where}: class {label} has {len(members)} examples, too few to leave any for "
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
