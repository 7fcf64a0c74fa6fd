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
    def pretrain_state(self) -> Path:
        """Pretraining's state after its last complete epoch; gone once the checkpoint is out."""
        return self.root / "data" / "checkpoints" / "pretrain.resume.pt"

    @property
    def checkpoint_meta(self) -> Path:
        return self.root / "data" / "checkpoints" / "backbone.json"

    def features(self, target: str) -> Path:
        return self.root / "data" / "features" / target

    def results(self, target: str) -> Path:
        return self.root / "data" / "results" / f"{target}.csv"

    def finetune_progress(self, target: str) -> Path:
        """The grid cells of `target` finished so far; gone once its results file is out."""
        return self.root / "data" / "results" / f"{target}.progress.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
