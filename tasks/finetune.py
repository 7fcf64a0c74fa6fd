"""Stage `finetune`: for one target, every strategy x label fraction x seed, scratch included.

Each run tunes its learning rate (or, for the probe, its L2 strength) on the validation split and
is scored on the test split once, after that choice. Rows go to data/results/<target>.csv.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks import files, runtime
from tasks.cli import run_stage
from tasks.datasets import SPLITS, Labelled, load_meta, load_split
from tasks.layout import Layout
from tasks.models import Classifier, build_classifier, load_checkpoint, pretrained_classifier
from tasks.params import FinetuneParams, Params
from tasks.probe import ProbeResult, fit_probe
from tasks.subsets import label_subset
from tasks.tracking import Run
from tasks.train import DeviceData, FitResult, evaluate, fit

log = logging.getLogger(__name__)
# The modules whose code decides a grid cell's result (part of the resume fingerprint).
CODE = ["finetune.py", "train.py", "probe.py", "models.py", "subsets.py", "runtime.py",
        "datasets.py"]  # fmt: skip

RESULT_COLUMNS = [
    "target", "strategy", "fraction", "seed", "n_labels", "lr", "l2",
    "val_acc", "test_acc", "best_epoch", "epochs_run",
]  # fmt: skip


@dataclass(frozen=True)
class TargetData:
    """What every run of one target reads, loaded once."""

    inputs: dict[str, Labelled]  # prepared splits: x (N, C, L)
    features: dict[str, Labelled]  # frozen-backbone features: x (N, D)
    num_classes: int
    checkpoint: dict[str, Any]  # the pretrained payload (see tasks.models)
    checkpoint_path: Path
    device: torch.device


@dataclass(frozen=True)
class Outcome:
    val_acc: float
    test_acc: float
    hparams: dict[str, float]  # the chosen lr or l2
    history: list[dict[str, float]] = field(default_factory=list)  # of the chosen run
    best_epoch: int = -1


def _fit_probe(data: TargetData, subset: np.ndarray, cfg: FinetuneParams) -> ProbeResult:
    def tensors(split: str, index: np.ndarray | slice = slice(None)):
        features = data.features[split]
        return torch.from_numpy(features.x[index]), torch.from_numpy(features.y[index])

    return fit_probe(
        tensors("train", subset), tensors("val"), tensors("test"), data.num_classes, cfg.probe_l2
    )


def _linear_probe(data: TargetData, subset: np.ndarray, cfg: FinetuneParams, seed: int) -> Outcome:
    result = _fit_probe(data, subset, cfg)
    return Outcome(result.val_acc, result.test_acc, {"l2": result.l2})


@dataclass(frozen=True)
class Start:
    """Where a network strategy starts from: a model, and the hyperparameters that made it."""

    model: Classifier
    hparams: dict[str, float] = field(default_factory=dict)


def _scratch_start(data: TargetData, subset: np.ndarray, cfg: FinetuneParams, seed: int) -> Start:
    return Start(build_classifier(data.checkpoint["arch"], data.num_classes, seed))


def _pretrained_start(
    data: TargetData, subset: np.ndarray, cfg: FinetuneParams, seed: int
) -> Start:
    return Start(
        pretrained_classifier(data.checkpoint, data.num_classes, seed, data.checkpoint_path)
    )


def _probed_start(data: TargetData, subset: np.ndarray, cfg: FinetuneParams, seed: int) -> Start:
    """LP-FT's first step (Kumar et al. 2022): the linear probe's solution becomes the head."""
    start = _pretrained_start(data, subset, cfg, seed)
    probe = _fit_probe(data, subset, cfg)
    with torch.no_grad():
        start.model.head.weight.copy_(probe.weight)
        start.model.head.bias.copy_(probe.bias)
    return Start(start.model, {"l2": probe.l2})


def _network(
    start: Callable[[TargetData, np.ndarray, FinetuneParams, int], Start],
    backbone_lr_scale: Callable[[FinetuneParams], float],
    frozen_blocks: Callable[[FinetuneParams], int] = lambda cfg: 0,
) -> Callable[[TargetData, np.ndarray, FinetuneParams, int], Outcome]:
    """A strategy that trains a network: the same loop and lr grid for all, its own start,
    backbone learning-rate scale and frozen blocks."""

    def run(data: TargetData, subset: np.ndarray, cfg: FinetuneParams, seed: int) -> Outcome:
        train = DeviceData.from_arrays(data.inputs["train"].take(subset), data.device)
        val = DeviceData.from_arrays(data.inputs["val"], data.device)
        begin = start(data, subset, cfg, seed)
        best: tuple[FitResult, float, Classifier] | None = None
        for lr in cfg.lrs:
            model = copy.deepcopy(begin.model).to(data.device)
            model.backbone.blocks[: frozen_blocks(cfg)].requires_grad_(False)
            trainable = [p for p in model.backbone.parameters() if p.requires_grad]
            groups = [
                {"params": trainable, "lr": lr * backbone_lr_scale(cfg)},
                {"params": model.head.parameters(), "lr": lr},
            ]
            result = fit(model, groups, train, val, cfg, seed=seed)
            if best is None or result.score > best[0].score:
                best = (result, lr, model)
        result, lr, model = best
        test = DeviceData.from_arrays(data.inputs["test"], data.device)
        test_acc = evaluate(model, test, 1024)["acc"]  # scored once, after the choice
        hparams = {"lr": lr, **begin.hparams}
        return Outcome(result.best_val_acc, test_acc, hparams, result.history, result.best_epoch)

    return run


def _discriminative(cfg: FinetuneParams) -> float:
    return cfg.backbone_lr_scale


STRATEGIES: dict[str, Callable[[TargetData, np.ndarray, FinetuneParams, int], Outcome]] = {
    "scratch": _network(_scratch_start, lambda cfg: 1.0),
    "linear_probe": _linear_probe,
    "finetune": _network(_pretrained_start, _discriminative),
    "lp_ft": _network(_probed_start, _discriminative),
    "partial": _network(_pretrained_start, _discriminative, lambda cfg: cfg.freeze_blocks),
}


def load_target(params: Params, target: str, layout: Layout) -> TargetData:
    device = runtime.configure(params.runtime)
    return TargetData(
        inputs={s: load_split(layout.prepared(target), s) for s in SPLITS},
        features={s: load_split(layout.features(target), s) for s in SPLITS},
        num_classes=load_meta(layout.prepared(target))["num_classes"],
        checkpoint=load_checkpoint(layout.checkpoint),
        checkpoint_path=layout.checkpoint,
        device=device,
    )


def finetune(params: Params, target: str, layout: Layout, run: Run) -> pd.DataFrame:
    """Run the grid for one target and write its results table."""
    cfg = params.finetune
    files.check_writable(layout.results(target).parent)
    data = load_target(params, target, layout)
    train_y = data.inputs["train"].y
    progress = Progress(layout.finetune_progress(target), _fingerprint(params, target, layout))
    rows, scratch_acc = [], {}  # scratch's test accuracy by (fraction, seed), for paired gains
    # scratch first, so that each transfer run can record its gain over its scratch partner
    strategies = sorted(cfg.strategies, key=lambda s: s != "scratch")
    inputs = data_files(target, layout)
    tags = {"stage": "finetune", "target": target}
    with run.child(f"finetune {target}", tags=tags, inputs=inputs) as stage:
        for strategy in strategies:
            for fraction in cfg.fractions:
                for seed in cfg.seeds:
                    done = progress.rows.get((strategy, fraction, seed))
                    if done is not None:  # finished before an interruption: not redone
                        rows.append(done)
                        scratch_acc.setdefault((fraction, seed), done["test_acc"])
                        continue
                    subset = label_subset(train_y, fraction, seed)
                    outcome = STRATEGIES[strategy](data, subset, cfg, seed)
                    row = {
                        "target": target, "strategy": strategy, "fraction": fraction,
                        "seed": seed, "n_labels": len(subset), "lr": np.nan, "l2": np.nan,
                        "val_acc": outcome.val_acc, "test_acc": outcome.test_acc,
                        "best_epoch": outcome.best_epoch, "epochs_run": len(outcome.history),
                    } | outcome.hparams  # fmt: skip
                    if strategy == "scratch":
                        scratch_acc[fraction, seed] = outcome.test_acc
                    rows.append(row)
                    progress.add(row)
                    gain = outcome.test_acc - scratch_acc[fraction, seed]
                    _record(stage, row, outcome, gain, inputs)
                    log.info("%s %-12s fraction %-5g seed %d: %d labels, test acc %.4f",
                             target, strategy, fraction, seed, len(subset),
                             outcome.test_acc)  # fmt: skip
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    files.write_text(layout.results(target), table.to_csv(index=False))
    progress.path.unlink(missing_ok=True)  # done: the next run starts afresh
    return table


class Progress:
    """The grid cells finished so far, rewritten atomically after each one, so that a rerun
    after a crash redoes only the unfinished cells (each cell depends on nothing but its seed
    and inputs, so the final table is the same as an uninterrupted run's)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[tuple[str, float, int], dict[str, Any]] = {}
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("fingerprint") == fingerprint:
            for row in saved["rows"]:
                self.rows[row["strategy"], row["fraction"], row["seed"]] = row
            log.info("resuming %s: %d grid cells already finished", path, len(self.rows))

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["strategy"], row["fraction"], row["seed"]] = row
        files.write_json(self.path, {"fingerprint": self.fingerprint,
                                     "rows": list(self.rows.values())})  # fmt: skip


def data_files(target: str, layout: Layout) -> list[Path]:
    """The files a target's grid reads: its splits, their features and the checkpoint."""
    inputs = [layout.prepared(target) / f"{s}.npz" for s in SPLITS]
    return inputs + [layout.features(target) / f"{s}.npz" for s in SPLITS] + [layout.checkpoint]


def _fingerprint(params: Params, target: str, layout: Layout) -> str:
    """What the target's grid depends on: params, inputs and the code that trains."""
    inputs = data_files(target, layout)
    code = [Path(__file__).with_name(name) for name in CODE]
    config = {k: getattr(params, k).model_dump(mode="json") for k in ("finetune", "runtime")}
    return files.fingerprint({**config, "torch": torch.__version__}, [*inputs, *code])


def _record(
    stage: Run, row: dict[str, Any], outcome: Outcome, gain: float, inputs: list[Path]
) -> None:
    """One MLflow run per grid cell: filter on target and fraction to see transfer by scratch."""
    transfer = row["strategy"] != "scratch"
    name = f"{row['target']}/{row['strategy']}/f{row['fraction']:g}/s{row['seed']}"
    tags = {"target": row["target"], "strategy": row["strategy"],
            "kind": "transfer" if transfer else "scratch"}  # fmt: skip
    with stage.child(name, tags=tags, inputs=inputs) as child:
        keys = ("target", "strategy", "fraction", "seed", "n_labels")
        child.log(
            params={k: row[k] for k in keys} | outcome.hparams,
            metrics={"val/acc": outcome.val_acc, "test/acc": outcome.test_acc}
            | ({"gain_vs_scratch": gain} if transfer else {}),
        )
        child.log_history(outcome.history)


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, finetune, argv, per_target=True)


if __name__ == "__main__":
    main()
