"""Stage `pretrain`, once per source: the backbone, pretrained on the source dataset (supervised
on its labels, contrastive on two augmented views of each example, or masked-language modelling
on its texts), or an off-the-shelf encoder's weights, recorded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tasks.config.params import Params, PretrainParams
from tasks.data.datasets import DataError, load_meta, load_split
from tasks.data.tokens import TOKENIZER_FILE
from tasks.frame import stage_command
from tasks.learning import distributed
from tasks.learning.augment import Augmented, build_augmentation
from tasks.learning.contrastive import Contrastive, TwoViews
from tasks.learning.mlm import MaskedLm, MaskedTokens, unigram_accuracy
from tasks.learning.train import (
    SUPERVISED,
    DeviceData,
    Resume,
    Shard,
    eval_batch_size,
    evaluate,
    fit,
)
from tasks.models.classifier import (
    Classifier,
    build_classifier,
    reset_parameters,
    save_checkpoint,
)
from tasks.models.errors import CheckpointError
from tasks.models.shapes import architecture, check_targets_fit
from tasks.models.vision import load_off_the_shelf
from tasks.recording.lineage import MD5_TAG, input_tags, md5
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import contracts, files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)


def pretrain(params: Params, source: str, layout: Layout, recorder: Recorder) -> dict[str, float]:
    """Train on `source`'s train/val; write the self-describing checkpoint and its metrics.

    With `pretrain.processes` > 1, the stage runs itself again under torchrun as that many
    data-parallel processes (tasks/learning/distributed.py) and returns the summary they wrote.
    """
    if not distributed.is_worker():  # once, before any training: every target fits
        shapes = _prepared_shapes(layout, source)
        targets = [name for name in shapes if name not in params.sources]
        check_targets_fit(params.model, shapes, source, targets)
    if params.pretrain.processes > 1 and not distributed.is_worker():
        files.check_writable(layout.checkpoint(source).parent)  # before any process starts
        return distributed.launch(params, source, layout, recorder)
    with distributed.ranks(params) as (device, shard):
        return _pretrain(params, source, layout, recorder, device, shard)


def _prepared_shapes(layout: Layout, source: str) -> dict[str, tuple[int, int]]:
    """(C, L) of every prepared dataset, by name (what `prepare` wrote is what params name).
    Read for a check only: the checkpoint does not depend on the targets, so dvc.yaml does not
    list their files (`extract` checks its target again)."""
    return {
        meta.parent.name: tuple(load_meta(meta.parent)["input_shape"])
        for meta in sorted(layout.prepared(source).parent.glob("*/meta.json"))
    }


def _pretrain(
    params: Params,
    name: str,
    layout: Layout,
    recorder: Recorder,
    device: torch.device,
    shard: Shard,
) -> dict[str, float]:
    """This process's pretraining of source `name`: all of it, or one rank's share; rank 0
    writes and records (the other ranks are handed a recorder that records nothing)."""
    cfg = params.pretrain
    if shard.rank == 0:
        files.check_writable(layout.checkpoint(name).parent)
    source = layout.prepared(name)
    meta = load_meta(source)
    if params.model.backbone == "pretrained":
        return _off_the_shelf(params, name, layout, recorder, meta, shard)
    if params.model.pretrained_path is not None:  # timm: weights from a file
        return _off_the_shelf_images(params, name, layout, recorder, meta, shard)
    train, val = (DeviceData.from_arrays(load_split(source, s), device) for s in ("train", "val"))
    arch = architecture(params.model, tuple(meta["input_shape"]), meta.get("tokens"))
    model = build_classifier(arch, meta["num_classes"], seed=cfg.seed).to(device)
    objective_name = params.sources[name].objective_or(cfg.objective)
    # what trains: the classifier itself, its encoder under BERT's prediction head (MLM), or
    # its backbone under SimCLR's projector (contrastive); the head and projector are dropped
    trained, objective = model, SUPERVISED
    if objective_name == "mlm":
        trained, objective = _masked_lm(model, meta["tokens"], cfg)
        trained.to(device)
    elif objective_name == "contrastive":
        trained = Contrastive(model.backbone, cfg.temperature, cfg.projection_dim, cfg.seed)
        trained, objective = trained.to(device), TwoViews(cfg.seed)
    # images: training batches augmented
    if transform := build_augmentation(cfg.augment, "pretrain.augment", train.x.shape[1:]):
        objective = Augmented(objective, transform, cfg.seed)

    shipped_test = meta["test_source"] == "shipped"  # the source's own test split, if any
    inputs = [source / f"{split}.npz" for split in ("train", "val", "test")[: 2 + shipped_test]]
    tags = stage_tags("pretrain", source=name)
    with recorder.child(f"pretrain {name}", tags=tags, inputs=inputs) as stage:
        stage.log(
            params={
                **cfg.model_dump(),
                "objective": objective_name,
                **arch,
                "device": device.type,
                "n_train": len(train),
            }
        )

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            stage.log(metrics=metrics, step=epoch)  # one batched request per epoch
            log.info("pretrain epoch %d: %s", epoch, _fmt(metrics))

        # a saved state is resumed only by a run of the same declared deps (dvc.yaml)
        resume = Resume(
            layout.pretrain_state(name),
            contracts.fingerprint("pretrain", params, layout.root, name),
        )
        started = time.perf_counter()
        result = fit(
            trained,
            [{"params": trained.parameters(), "lr": cfg.lr}],
            train,
            val,
            cfg,
            seed=cfg.seed,
            on_epoch=on_epoch,
            resume=resume,
            shard=shard,
            compile_model=params.runtime.compile,
            objective=objective,
        )
        summary = {
            # MLM: of the masked tokens; contrastive: of the positive view among the batch's
            "val_acc": result.best_val_acc,
            "val_loss": evaluate(trained, val, eval_batch_size(cfg), objective)["loss"],
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            # what pretraining cost, for the compute table: every epoch run (early stopping's
            # patience included); its seconds go to a file of their own (measured, they differ
            # between executions, and nothing downstream may depend on them)
            "steps": len(result.history) * -(-len(train) // cfg.batch_size),
        }
        seconds = time.perf_counter() - started  # of this process: since a resume, if any
        if objective_name == "mlm":  # what guessing the commonest token scores
            train_ids = train.x.cpu().numpy()
            summary["val_unigram_acc"] = unigram_accuracy(
                objective, train_ids, val, eval_batch_size(cfg)
            )
        elif shipped_test and objective_name == "supervised":  # scored once, after training
            test = DeviceData.from_arrays(load_split(source, "test"), device)
            summary["test_acc"] = evaluate(model, test, 1024)["acc"]
        if shard.rank == 0:
            _write(params, name, objective_name, layout, model, meta, summary, stage, inputs)
            files.write_json(layout.pretrain_seconds(name), {"seconds": seconds})
    log.info(
        "pretrained backbone on %s (%s): val acc %.4f at epoch %d",
        *(name, objective_name, summary["val_acc"], result.best_epoch),
    )
    return summary


def _off_the_shelf(
    params: Params, name: str, layout: Layout, recorder: Recorder, meta: dict, shard: Shard
) -> dict[str, float]:
    """An off-the-shelf encoder in place of pretraining: its weights become the checkpoint
    (with a fresh head for the source's classes), and the run records where they came from.
    They must be the very weights `prepare` took the tokenizer and hash from."""
    from tasks.models.pretrained import PretrainedEncoder, read_pretrained_dir  # slow import

    path = params.model.pretrained_path
    weights = read_pretrained_dir(path)
    _prepared_weights(path, meta, weights.weights_sha256)  # what `prepare` tokenised with
    arch = {"name": "pretrained", "config": weights.config, "pad_id": weights.pad_id}
    # the encoder as read, under a seeded head (building a random encoder first would cost a
    # second 22M-weight init for nothing)
    model = Classifier(PretrainedEncoder.from_files(weights), meta["num_classes"], arch)
    reset_parameters(model.head, torch.Generator().manual_seed(params.pretrain.seed))
    origin = {"pretrained_path": str(path), "weights_sha256": weights.weights_sha256}
    inputs = [path / weights.weights_file]
    tags = stage_tags("pretrain", source=name)
    with recorder.child(f"pretrain {name}", tags=tags, inputs=inputs) as stage:
        stage.log(params={**origin, "weights_file": weights.weights_file})
        summary = {"epochs_run": 0, "steps": 0}  # nothing trained here
        if shard.rank == 0:
            _write(params, name, "off-the-shelf", layout, model, meta, summary, stage, inputs)
            files.write_json(layout.pretrain_seconds(name), {"seconds": 0.0})
    log.info("off-the-shelf backbone from %s (sha256 %s)", path, weights.weights_sha256)
    return summary


def _prepared_weights(path: Path, meta: dict, sha256: str) -> None:
    """Refuse off-the-shelf weights (a file, or an encoder's directory) other than those
    `prepare` recorded, by path and hash."""
    prepared = meta.get("pretrained", {})
    if prepared.get("path") != str(path):
        raise CheckpointError(
            f"{path}: `prepare` ran for {prepared.get('path') or 'our own backbone'}, not these "
            "weights; run prepare again"
        )
    if sha256 != prepared["sha256"]:
        raise CheckpointError(
            f"{path}: changed since `prepare` read it (sha256 {sha256}, prepared with "
            f"{prepared['sha256']}); run prepare again"
        )


def _off_the_shelf_images(
    params: Params, name: str, layout: Layout, recorder: Recorder, meta: dict, shard: Shard
) -> dict[str, float]:
    """Off-the-shelf weights for the params' timm architecture, from a local file, in place of
    pretraining: the checkpoint holds them under a seeded head for the source's classes."""
    path = params.model.pretrained_path
    sha256 = files.sha256(path)
    _prepared_weights(path, meta, sha256)
    arch = architecture(params.model, tuple(meta["input_shape"]))
    model = build_classifier(arch, meta["num_classes"], seed=params.pretrain.seed)
    load_off_the_shelf(model.backbone, path)
    tags = stage_tags("pretrain", source=name)
    with recorder.child(f"pretrain {name}", tags=tags, inputs=[path]) as stage:
        stage.log(params={"pretrained_path": str(path), "weights_sha256": sha256, **arch})
        summary = {"epochs_run": 0, "steps": 0}  # nothing trained here
        if shard.rank == 0:
            _write(params, name, "off-the-shelf", layout, model, meta, summary, stage, [path])
            files.write_json(layout.pretrain_seconds(name), {"seconds": 0.0})
    log.info("off-the-shelf %s weights from %s (sha256 %s)", arch["architecture"], path, sha256)
    return summary


def _masked_lm(
    model: Classifier, tokens: dict, cfg: PretrainParams
) -> tuple[MaskedLm, MaskedTokens]:
    """The classifier's encoder under a seeded MLM head, and the objective that trains it."""
    if "never_masked" not in tokens:
        raise DataError("data/prepared was prepared by an older version; run prepare again")
    masked_lm = MaskedLm(model.backbone, tokens["vocab_size"])
    reset_parameters(masked_lm.head, torch.Generator().manual_seed(cfg.seed))
    objective = MaskedTokens(
        cfg.mask_prob,
        tokens["mask_id"],
        tokens["vocab_size"],
        tuple(tokens["special_ids"]),
        tuple(tokens["never_masked"]),
        cfg.seed,
    )
    return masked_lm, objective


def _write(
    params: Params,
    name: str,
    objective: str,
    layout: Layout,
    model: Classifier,
    meta: dict,
    summary: dict[str, float],
    stage: Recorder,
    inputs: list[Path],
) -> None:
    """Rank 0's part: write source `name`'s checkpoint and its metrics (`inputs`: the source
    files read; `objective`: how it learnt), record it in MLflow and register it."""
    tokenizer = layout.prepared(name) / TOKENIZER_FILE  # texts only
    checkpoint = layout.checkpoint(name)
    save_checkpoint(
        checkpoint,
        model,
        params={
            "model": params.model.model_dump(mode="json"),
            # the source's own objective: LEEP reads a head only a supervised one trained
            "pretrain": params.pretrain.model_dump(mode="json") | {"objective": objective},
        },
        source_meta=meta,
        metrics=summary,
        # what turns texts into the ids it reads, so that the checkpoint is all one needs
        **({"tokenizer": tokenizer.read_text()} if "tokens" in meta else {}),
    )
    files.write_json(layout.checkpoint_meta(name), summary)  # for `dvc metrics show`
    layout.pretrain_state(name).unlink(missing_ok=True)  # done: the next run starts afresh
    # the checkpoint it wrote, by the hash that dvc.lock will hold for it
    written = input_tags(layout.root, [checkpoint])
    scores = {f"best/{key}": summary[key] for key in ("val_acc", "test_acc") if key in summary}
    stage.log(metrics=scores, tags=written)
    data = input_tags(layout.root, inputs)
    version = stage.register_model(
        model.cpu(),
        load_split(layout.prepared(name), "val").x[:2],
        registered_name(params, name),
        tags={
            "source": name,
            "objective": objective,
            **data,
            **written,
            **{k: f"{summary[k]:.6f}" for k in ("val_acc",) if k in summary},
        },
        content=md5(checkpoint),  # an unchanged checkpoint keeps its version
        description=_describe(params, objective, meta, summary, data),
    )
    if version is not None:
        log.info("registered %s version %s", registered_name(params, name), version)


def registered_name(params: Params, source: str) -> str:
    """The Model Registry name of the backbone pretrained on `source`: each source's backbones
    are the versions of one registered model."""
    return f"{params.registered_model}-{source}"


def _describe(
    params: Params, objective: str, meta: dict, summary: dict[str, float], data: dict[str, str]
) -> str:
    """A registered version's description: what it learnt from, how well, on which files."""
    spec = meta["spec"]  # the source's spec as prepared (not params: pretrain does not read it)
    scores = ", ".join(
        f"{key.replace('_', ' ')} {summary[key]:.4f}"
        for key in ("val_acc", "test_acc")
        if key in summary
    )
    files_read = "; ".join(f"{k.removeprefix(MD5_TAG)} md5 {v}" for k, v in data.items())
    if "pretrained" in meta:
        origin = meta["pretrained"]
        return (
            f"Off-the-shelf weights from {origin['path']} (sha256 {origin['sha256']}), "
            f"not trained here. Data: {files_read}."
        )
    return (
        f"{params.model.backbone} backbone pretrained ({objective}) on "
        f"{spec.get('path') or spec['kind']} "
        f"(classes {', '.join(map(str, meta['classes']))}): {scores}. Data: {files_read}."
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def main(argv: list[str] | None = None) -> None:
    if distributed.is_worker():  # one rank, under torchrun
        distributed.rank_command(__doc__, pretrain, argv)
    else:
        stage_command(__doc__, pretrain, argv, per="source")


if __name__ == "__main__":
    main()
