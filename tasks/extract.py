"""Stage `extract`: run the frozen pretrained backbone once over a target's splits."""

from __future__ import annotations

import logging

import numpy as np
import torch

from tasks.config.params import Params
from tasks.data.datasets import SPLITS, Labelled, load_meta, load_split, save_splits
from tasks.frame import stage_command
from tasks.learning import runtime
from tasks.models.classifier import (
    FRESH_INPUT_SEED,
    load_checkpoint,
    pretrained_classifier,
)
from tasks.models.shapes import transfer_note
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)


def extract(params: Params, target: str, layout: Layout, recorder: Recorder) -> dict[str, int]:
    """Write data/features/<target>/{train,val,test}.npz with x (N, D) float32 and y (N,)."""
    files.check_writable(layout.features(target))
    device = runtime.configure(params.runtime)
    prepared = layout.prepared(target)
    meta = load_meta(prepared)
    shape = tuple(meta["input_shape"])  # (C, L)
    payload = load_checkpoint(layout.checkpoint)
    note = transfer_note(payload["arch"], target, shape)  # refuses a backbone of one layer
    if note:
        log.warning("%s (seed %d), under the pretrained layers", note, FRESH_INPUT_SEED)
    model = pretrained_classifier(payload, 1, seed=0, path=layout.checkpoint, input_shape=shape)
    backbone = model.backbone.to(device).eval()
    features = {}
    inputs = [prepared / f"{s}.npz" for s in SPLITS] + [layout.checkpoint]
    tags = stage_tags("extract", target=target)
    with recorder.child(f"extract {target}", tags=tags, inputs=inputs) as stage:
        for split in SPLITS:
            data = load_split(prepared, split)
            features[split] = Labelled(
                _embed(backbone, data.x, device, params.extract.batch_size), data.y
            )
        save_splits(
            layout.features(target),
            features,
            {**meta, "feature_dim": int(features["train"].x.shape[1])},
        )
        stage.log(
            params={"target": target, "feature_dim": features["train"].x.shape[1]},
            metrics={f"{s}_size": len(f) for s, f in features.items()},
        )
    log.info("extracted %s features: %s", target, {s: f.x.shape for s, f in features.items()})
    return {split: len(f) for split, f in features.items()}


@torch.no_grad()
def _embed(
    backbone: torch.nn.Module, x: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    chunks = [
        backbone(torch.from_numpy(x[start : start + batch_size]).to(device)).float().cpu()
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(chunks).numpy()  # (N, D)


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, extract, argv, per_target=True)


if __name__ == "__main__":
    main()
