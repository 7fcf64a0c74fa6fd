"""Stage `pretrain`: supervised pretraining of the backbone on the source dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tasks.config.params import Params
from tasks.data.datasets import load_meta, load_split
from tasks.frame import stage_command
from tasks.learning import distributed
from tasks.learning.train import DeviceData, Resume, Shard, evaluate, fit
from tasks.models.classifier import Classifier, build_classifier, save_checkpoint
from tasks.models.shapes import architecture, check_targets_fit
from tasks.recording.lineage import MD5_TAG, input_tags, md5
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import contracts, files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)


def pretrain(params: Params, layout: Layout, recorder: Recorder) -> dict[str, float]:
    """Train on source train/val; write the self-describing checkpoint and its metrics.

    With `pretrain.processes` > 1, the stage runs itself again under torchrun as that many
    data-parallel processes (tasks/learning/distributed.py) and returns the summary they wrote.
    """
    if not distributed.is_worker():  # once, before any training: every target fits
        check_targets_fit(params.model, _prepared_shapes(layout))
    if params.pretrain.processes > 1 and not distributed.is_worker():
        files.check_writable(layout.checkpoint.parent)  # before any process starts
        return distributed.launch(params, layout, recorder)
    with distributed.ranks(params) as (device, shard):
        return _pretrain(params, layout, recorder, device, shard)


def _prepared_shapes(layout: Layout) -> dict[str, tuple[int, int]]:
    """(C, L) of every prepared dataset, by name (what `prepare` wrote is what params name).
    Read for a check only: the checkpoint does not depend on the targets, so dvc.yaml does not
    list their files (`extract` checks its target again)."""
    return {
        meta.parent.name: tuple(load_meta(meta.parent)["input_shape"])
        for meta in sorted(layout.prepared("source").parent.glob("*/meta.json"))
    }


def _pretrain(
    params: Params, layout: Layout, recorder: Recorder, device: torch.device, shard: Shard
) -> dict[str, float]:
    """This process's pretraining: all of it, or one rank's share; rank 0 writes and records
    (the other ranks are handed a recorder that records nothing)."""
    cfg = params.pretrain
    if shard.rank == 0:
        files.check_writable(layout.checkpoint.parent)
    source = layout.prepared("source")
    meta = load_meta(source)
    train, val = (DeviceData.from_arrays(load_split(source, s), device) for s in ("train", "val"))
    arch = architecture(params.model, tuple(meta["input_shape"]))
    model = build_classifier(arch, meta["num_classes"], seed=cfg.seed).to(device)

    shipped_test = meta["test_source"] == "shipped"  # the source's own test split, if any
    inputs = [source / f"{split}.npz" for split in ("train", "val", "test")[: 2 + shipped_test]]
    with recorder.child("pretrain", tags=stage_tags("pretrain"), inputs=inputs) as stage:
        stage.log(
            params={**cfg.model_dump(), **arch, "device": device.type, "n_train": len(train)}
        )

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            stage.log(metrics=metrics, step=epoch)  # one batched request per epoch
            log.info("pretrain epoch %d: %s", epoch, _fmt(metrics))

        # a saved state is resumed only by a run of the same declared deps (dvc.yaml)
        resume = Resume(
            layout.pretrain_state, contracts.fingerprint("pretrain", params, layout.root)
        )
        result = fit(
            model,
            [{"params": model.parameters(), "lr": cfg.lr}],
            train,
            val,
            cfg,
            seed=cfg.seed,
            on_epoch=on_epoch,
            resume=resume,
            shard=shard,
            compile_model=params.runtime.compile,
        )
        summary = {
            "val_acc": result.best_val_acc,
            "val_loss": evaluate(model, val, 1024)["loss"],
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
        }
        if shipped_test:  # scored once, after training: how good the backbone is at its task
            test = DeviceData.from_arrays(load_split(source, "test"), device)
            summary["test_acc"] = evaluate(model, test, 1024)["acc"]
        if shard.rank == 0:
            _write(params, layout, model, meta, summary, stage, inputs)
    log.info(
        "pretrained backbone: val acc %.4f at epoch %d", summary["val_acc"], result.best_epoch
    )
    return summary


def _write(
    params: Params,
    layout: Layout,
    model: Classifier,
    meta: dict,
    summary: dict[str, float],
    stage: Recorder,
    inputs: list[Path],
) -> None:
    """Rank 0's part: write the checkpoint and its metrics (`inputs`: the source files read),
    record it in MLflow and register it."""
    save_checkpoint(
        layout.checkpoint,
        model,
        params={"model": params.model.model_dump(), "pretrain": params.pretrain.model_dump()},
        source_meta=meta,
        metrics=summary,
    )
    files.write_json(layout.checkpoint_meta, summary)  # for `dvc metrics show`
    layout.pretrain_state.unlink(missing_ok=True)  # done: the next run starts afresh
    # the checkpoint it wrote, by the hash that dvc.lock will hold for it
    written = input_tags(layout.root, [layout.checkpoint])
    scores = {f"best/{key}": summary[key] for key in ("val_acc", "test_acc") if key in summary}
    stage.log(metrics=scores, tags=written)
    data = input_tags(layout.root, inputs)
    version = stage.register_model(
        model.cpu(),
        load_split(layout.prepared("source"), "val").x[:2],
        params.registered_model,
        tags={**data, **written, "val_acc": f"{summary['val_acc']:.6f}"},
        content=md5(layout.checkpoint),  # an unchanged checkpoint keeps its version
        description=_describe(params, meta, summary, data),
    )
    if version is not None:
        log.info("registered %s version %s", params.registered_model, version)


def _describe(params: Params, meta: dict, summary: dict[str, float], data: dict[str, str]) -> str:
    """A registered version's description: what it learnt from, how well, on which files."""
    spec = meta["spec"]  # the source's spec as prepared (not params: pretrain does not read it)
    scores = ", ".join(
        f"{key.replace('_', ' ')} {summary[key]:.4f}"
        for key in ("val_acc", "test_acc")
        if key in summary
    )
    files_read = "; ".join(f"{k.removeprefix(MD5_TAG)} md5 {v}" for k, v in data.items())
    return (
        f"{params.model.backbone} backbone pretrained on {spec.get('path') or spec['kind']} "
        f"(classes {', '.join(map(str, meta['classes']))}): {scores}. Data: {files_read}."
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    if distributed.is_worker():  # one rank, under torchrun
        distributed.rank_command(__doc__, pretrain, argv)
    else:
        stage_command(__doc__, pretrain, argv)


if __name__ == "__main__":
    main()
