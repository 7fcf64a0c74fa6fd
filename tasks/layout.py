"""The file contract between stages: where each stage writes, relative to the workspace root.

dvc.yaml declares the same paths; tests/test_contracts.py keeps the two from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def prepared(self, dataset: str) -> Path:
        return self.root / "data" / "prepared" / dataset

    @property
    def checkpoint(self) -> Path:
        return self.root / "data" / "checkpoints" / "backbone.pt"

    @property
    def checkpoint_meta(self) -> Path:
        return self.root / "data" / "checkpoints" / "backbone.json"

    def features(self, target: str) -> Path:
        return self.root / "data" / "features" / target

    def results(self, target: str) -> Path:
        return self.root / "data" / "results" / f"{target}.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
