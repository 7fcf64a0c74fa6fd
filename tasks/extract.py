"""Stage `extract`, once per target: run each source's frozen pretrained backbone once over the
target's splits, and score how well each source should transfer before any fine-tuning
(transferability: LogME, H-score, and LEEP where the source trained a classifier head)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from tasks.analysis.transferability import h_score, leep, logme
from tasks.config.params import Params
from tasks.data.datasets import SPLITS, Labelled, load_meta, load_split, save_splits
from tasks.data.subsets import label_subset, resolve_budgets
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

SCORE_COLUMNS = ["source", "budget", "seed", "n_labels", "logme", "h_score", "leep"]


def extract(params: Params, target: str, layout: Layout, recorder: Recorder) -> pd.DataFrame:
    """Write data/features/<target>/<source>/{train,val,test}.npz (x (N, D) float32, y (N,))
    for every source, and data/scores/<target>.csv; return the scores."""
    folder = layout.features(target, "any").parent
    files.check_writable(folder, layout.scores(target).parent)
    device = runtime.configure(params.runtime)
    prepared = layout.prepared(target)
    meta = load_meta(prepared)
    data = {split: load_split(prepared, split) for split in SPLITS}
    tables = []
    for source in params.sources:
        checkpoint = layout.checkpoint(source)
        inputs = [prepared / f"{s}.npz" for s in SPLITS] + [checkpoint]
        tags = stage_tags("extract", target=target, source=source)
        with recorder.child(f"extract {target} {source}", tags=tags, inputs=inputs) as stage:
            features, head = _features(params, target, source, layout, data, device)
            feature_dim = int(features["train"].x.shape[1])
            save_splits(
                layout.features(target, source), features, meta | {"feature_dim": feature_dim}
            )
            scores = _scores(params, source, features["train"], head, meta["num_classes"])
            stage.log(
                params={"target": target, "source": source, "feature_dim": feature_dim},
                metrics={f"{s}_size": len(f) for s, f in features.items()}
                # at the most labels (budgets come fewest first)
                | {f"{name}_most_labels": scores[name].iloc[-1] for name in ("logme", "h_score")},
            )
        tables.append(scores)
        log.info("extracted %s features through %s's backbone", target, source)
    table = pd.concat(tables, ignore_index=True)[SCORE_COLUMNS]
    files.write_text(layout.scores(target), table.to_csv(index=False))
    files.prune(folder, keep=set(params.sources))  # the features of removed sources
    return table


def _features(
    params: Params,
    target: str,
    source: str,
    layout: Layout,
    data: dict[str, Labelled],
    device: torch.device,
) -> tuple[dict[str, Labelled], torch.Tensor]:
    """The target's splits through `source`'s frozen backbone, and the source's classifier head
    (Z, D + 1: weights, then bias) if pretraining trained one (supervised), else (0, D + 1)."""
    checkpoint = layout.checkpoint(source)
    shape = tuple(data["train"].x.shape[1:])  # (C, L)
    payload = load_checkpoint(checkpoint)
    note = transfer_note(payload["arch"], target, shape)  # refuses a backbone of one layer
    if note:
        log.warning("%s (seed %d), under the pretrained layers", note, FRESH_INPUT_SEED)
    model = pretrained_classifier(payload, 1, seed=0, path=checkpoint, input_shape=shape)
    backbone = model.backbone.to(device).eval()
    batch = params.extract.batch_size
    features = {s: Labelled(_embed(backbone, d.x, device, batch), d.y) for s, d in data.items()}
    state = payload["state_dict"]
    head = torch.cat([state["head.weight"], state["head.bias"][:, None]], dim=1)  # (Z, D + 1)
    trained_head = payload.get("params", {}).get("pretrain", {}).get("objective") == "supervised"
    return features, head if trained_head else head[:0]


def _scores(
    params: Params, source: str, train: Labelled, head: torch.Tensor, num_classes: int
) -> pd.DataFrame:
    """Each score on the labelled training examples of every label budget and seed: the very
    subsets `finetune` draws. LEEP reads the source head's class probabilities (NaN without a
    trained head)."""
    cfg = params.finetune
    budgets, _ = resolve_budgets(train.y, cfg.fractions, cfg.shots)  # finetune warns of merges
    x = train.x.astype(np.float64)  # (N, D)
    probs = None
    if len(head):  # softmax(x W^T + b): (N, Z)
        logits = torch.from_numpy(x) @ head[:, :-1].double().T + head[:, -1].double()
        probs = torch.softmax(logits, dim=1).numpy()
    rows = []
    for budget in budgets:
        for seed in cfg.seeds:
            subset = label_subset(train.y, budget.per_class, seed)
            y = train.y[subset]
            rows.append(
                {
                    "source": source,
                    "budget": budget.name,
                    "seed": seed,
                    "n_labels": len(subset),
                    "logme": logme(x[subset], y, num_classes),
                    "h_score": h_score(x[subset], y),
                    "leep": leep(probs[subset], y, num_classes) if probs is not None else np.nan,
                }
            )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


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
    stage_command(__doc__, extract, argv, per="target")


if __name__ == "__main__":
    main()
