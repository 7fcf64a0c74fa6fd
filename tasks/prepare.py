"""Stage `prepare`: build the source and every target dataset with fixed, stratified splits."""

from __future__ import annotations

import logging

import numpy as np

from tasks.config.params import Params
from tasks.data.datasets import SPLITS, save_splits
from tasks.data.sources import build_splits, datasets
from tasks.frame import stage_command
from tasks.recording.recorder import Recorder
from tasks.workspace import files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)


def prepare(params: Params, layout: Layout, recorder: Recorder) -> dict[str, dict[str, int]]:
    """Write data/prepared/<dataset>/{train,val,test}.npz and meta.json; return split sizes."""
    named = datasets(params)
    root = layout.prepared("source").parent
    files.check_writable(root)
    sizes = {}
    user_files = [spec.path for spec, _ in named.values() if spec.path is not None]
    with recorder.child("prepare", tags={"stage": "prepare"}, inputs=user_files) as stage:
        # Build and check every dataset before writing any, so that a bad one changes nothing.
        built = {
            name: build_splits(spec, params.split, where) for name, (spec, where) in named.items()
        }
        for name, (splits, classes) in built.items():
            spec = named[name][0]
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
        files.prune(root, keep=set(named))  # datasets no longer in params
        stage.log(
            params={"datasets": ",".join(named)},
            metrics={f"{n}/{s}_size": v for n, split in sizes.items() for s, v in split.items()},
        )
    return sizes


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, prepare, argv)


if __name__ == "__main__":
    main()
