"""Stage `prepare`: build the source and every target dataset with fixed, stratified splits."""

from __future__ import annotations

import logging

import numpy as np

from tasks.cli import run_stage
from tasks.config.params import Params
from tasks.data.datasets import SPLITS, save_splits
from tasks.data.sources import build_splits
from tasks.recording.tracking import Run
from tasks.workspace.layout import Layout
from tasks.workspace import files

log = logging.getLogger(__name__)


def prepare(params: Params, layout: Layout, run: Run) -> dict[str, dict[str, int]]:
    """Write data/prepared/<dataset>/{train,val,test}.npz and meta.json; return split sizes."""
    datasets = {"source": params.source, **params.targets}
    root = layout.prepared("source").parent
    files.check_writable(root)
    sizes = {}
    user_files = [spec.path for spec in datasets.values() if spec.path is not None]
    with run.child("prepare", tags={"stage": "prepare"}, inputs=user_files) as stage:
        # Build and check every dataset before writing any, so that a bad one changes nothing.
        built = {}
        for name, spec in datasets.items():
            where = "source" if name == "source" else f"targets.{name}"
            origin = spec.path or spec.kind  # a user's file is named in any error
            built[name] = build_splits(spec, params.split, where=f"{where} ({origin})")
        for name, (splits, classes) in built.items():
            spec = datasets[name]
            sizes[name] = {split: len(splits[split]) for split in SPLITS}
            meta = {
                "name": name,
                "spec": spec.model_dump(mode="json"),
                "classes": classes,  # original label of each class index 0..K-1
                "num_classes": len(classes),
                "input_shape": list(splits["train"].x.shape[1:]),  # (C, L)
                "sizes": sizes[name],
                "train_class_counts": np.bincount(
                    splits["train"].y, minlength=len(classes)
                ).tolist(),
            }
            save_splits(layout.prepared(name), splits, meta)
            log.info("prepared %s: %s", name, sizes[name])
        files.prune(root, keep=set(datasets))  # datasets no longer in params
        stage.log(
            params={"datasets": ",".join(datasets)},
            metrics={f"{n}/{s}_size": v for n, split in sizes.items() for s, v in split.items()},
        )
    return sizes


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, prepare, argv)


if __name__ == "__main__":
    main()
