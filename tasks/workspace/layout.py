"""The file contract between stages: where each stage writes, relative to the workspace root.

dvc.yaml declares the same paths; tests/test_contracts.py keeps the two from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    @property
    def corpora(self) -> Path:
        """The synthesised spoken-word corpora."""
        return self.root / "data" / "synthesized"

    def synthesized(self, corpus: str) -> Path:
        """A corpus's sounds, <corpus>/<label>/*.wav: an audio folder."""
        return self.corpora / corpus

    def synthesis_manifest(self, corpus: str) -> Path:
        """What each of the corpus's sounds drew: voice, rate, pitch, noise, gain."""
        return self.corpora / f"{corpus}.csv"

    def synthesizer_version(self, corpus: str) -> Path:
        """The installed version of the corpus's synthesizer: DVC reruns its synthesis when it
        changes."""
        return self.corpora / f"{corpus}.version.json"

    def prepared(self, dataset: str) -> Path:
        return self.root / "data" / "prepared" / dataset

    def checkpoint(self, source: str) -> Path:
        return self.root / "data" / "checkpoints" / source / "backbone.pt"

    def pretrain_state(self, source: str) -> Path:
        """Pretraining's state after its last complete epoch; gone once the checkpoint is out."""
        return self.root / "data" / "checkpoints" / source / "pretrain.resume.pt"

    def checkpoint_meta(self, source: str) -> Path:
        return self.root / "data" / "checkpoints" / source / "backbone.json"

    def features(self, target: str, source: str) -> Path:
        """The target's splits through the backbone pretrained on `source`."""
        return self.root / "data" / "features" / target / source

    def scores(self, target: str) -> Path:
        """Transferability scores of every source for the target, per label budget and seed."""
        return self.root / "data" / "scores" / f"{target}.csv"

    def pretrain_seconds(self, source: str) -> Path:
        """How long `source`'s pretraining took: measured, so apart from what is reproduced."""
        return self.root / "data" / "timings" / "pretrain" / f"{source}.json"

    def finetune_seconds(self, target: str) -> Path:
        """Each of the target's results' seconds per run-epoch: measured, as above."""
        return self.root / "data" / "timings" / "finetune" / f"{target}.json"

    def results(self, target: str) -> Path:
        return self.root / "data" / "results" / f"{target}.csv"

    def curves(self, target: str) -> Path:
        """Each result's validation curve and steps per epoch: what the compute table reads."""
        return self.root / "data" / "results" / f"{target}.curves.json"

    def finetune_progress(self, target: str) -> Path:
        """The grid cells of `target` finished so far; gone once its results file is out."""
        return self.root / "data" / "results" / f"{target}.progress.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
