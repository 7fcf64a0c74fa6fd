"""Texts as users have them: a table (.csv, .parquet, .jsonl) with a text and a label column, and
the built-in fortunes of Debian's packages. Each reader returns the raw texts (N,) str with their
labels as stored; tokenising happens in `prepare` (tasks/data/tokens.py)."""

from __future__ import annotations

import numpy as np

from tasks.config.params import DatasetSpec
from tasks.data.datasets import RawDataset


def read_text_table(spec: DatasetSpec, key: str) -> RawDataset:
    raise NotImplementedError


def read_fortunes(spec: DatasetSpec, key: str) -> RawDataset:
    raise NotImplementedError


def encipher(texts: np.ndarray, seed: int) -> np.ndarray:
    raise NotImplementedError
