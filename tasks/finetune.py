"""Stage `finetune`: for one target, every strategy x label fraction x seed, scratch included.

Each run tunes its learning rate (or, for the probe, its L2 strength) on the validation split and
is scored on the test split once, after that choice. Rows go to data/results/<target>.csv.

The unit of work is a group: one strategy at one label fraction, all seeds. A network strategy
trains a group's seeds x learning rates as one vectorised ensemble (tasks/learning/ensemble.py). A group
reads only the arrays it is given and writes nothing (`train_group`), so a driver can run the
groups anywhere: here one after another (`finetune`, what `dvc repro` runs), or in parallel on
the Prefect flow's task runner, threads or Dask workers (flows/pipeline.py). The driver records
the cells in MLflow and writes the table (`TargetGrid`).
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

from tasks.cli import run_stage
from tasks.config.params import FinetuneParams, Params
from tasks.data.datasets import SPLITS, Labelled, load_meta, load_split
from tasks.data.subsets import label_subset
from tasks.learning import runtime
from tasks.learning.ensemble import Member, fit_ensemble
from tasks.learning.probe import ProbeResult, fit_probe
from tasks.learning.train import DeviceData, evaluate
from tasks.models.classifier import (
    Classifier,
    build_classifier,
    load_checkpoint,
    pretrained_classifier,
)
from tasks.recording.tracking import Run
from tasks.workspace.layout import Layout
from tasks.workspace import files

log = logging.getLogger(__name__)
# The modules whose code decides a grid cell's result (part of the resume fingerprint).
CODE = ["finetune.py", "ensemble.py", "train.py", "probe.py", "models.py", "subsets.py",
        "runtime.py", "datasets.py"]  # fmt: skip

RESULT_COLUMNS = [
    "target", "strategy", "fraction", "seed", "n_labels", "lr", "l2",
    "val_acc", "test_acc", "best_epoch", "epochs_run",
]  # fmt: skip


@dataclass(frozen=True)
class TargetData:
    """What every run of one target reads, loaded once. Plain arrays and tensors: it is shipped
    as it is to a worker process (or machine) that trains a group of runs."""

    name: str  # the target's name in params
    inputs: dict[str, Labelled]  # prepared splits: x (N, C, L)
    features: dict[str, Labelled]  # frozen-backbone features: x (N, D)
    num_classes: int
    checkpoint: dict[str, Any]  # the pretrained payload (see tasks.models.classifier)
    checkpoint_path: Path  # named in error messages only


@dataclass(frozen=True)
class Outcome:
    val_acc: float
    test_acc: float
    hparams: dict[str, float]  # the chosen lr or l2
    history: list[dict[str, float]] = field(default_factory=list)  # of the chosen run
    best_epoch: int = -1


# A strategy trains every seed of one label fraction: seed -> its label subset, in; seed -> its
# outcome, out. Seeds come together so that a network strategy can train them as one ensemble.
Strategy = Callable[[TargetData, dict[int, np.ndarray], FinetuneParams, torch.device],
                    dict[int, Outcome]]  # fmt: skip


def _fit_probe(data: TargetData, subset: np.ndarray, cfg: FinetuneParams) -> ProbeResult:
    def tensors(split: str, index: np.ndarray | slice = slice(None)):
        features = data.features[split]
        return torch.from_numpy(features.x[index]), torch.from_numpy(features.y[index])

    return fit_probe(
        tensors("train", subset), tensors("val"), tensors("test"), data.num_classes, cfg.probe_l2
    )


def _linear_probe(
    data: TargetData, subsets: dict[int, np.ndarray], cfg: FinetuneParams, device: torch.device
) -> dict[int, Outcome]:
    """Logistic regression on the cached features; the seed only draws the label subset."""
    outcomes = {}
    for seed, subset in subsets.items():
        result = _fit_probe(data, subset, cfg)
        outcomes[seed] = Outcome(result.val_acc, result.test_acc, {"l2": result.l2})
    return outcomes


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
) -> Strategy:
    """A strategy that trains a network: the same loop and lr grid for all, its own start,
    backbone learning-rate scale and frozen blocks."""

    def run(
        data: TargetData, subsets: dict[int, np.ndarray], cfg: FinetuneParams, device: torch.device
    ) -> dict[int, Outcome]:
        # every seed x lr of this fraction is one member of one vectorised ensemble
        members, starts = [], {}
        for seed, subset in subsets.items():
            starts[seed] = start(data, subset, cfg, seed)
            train = DeviceData.from_arrays(data.inputs["train"].take(subset), device)
            for lr in cfg.lrs:
                model = copy.deepcopy(starts[seed].model)
                model.backbone.blocks[: frozen_blocks(cfg)].requires_grad_(False)
                members.append(Member(model, train, lr, seed))
        scale = backbone_lr_scale(cfg)
        val = DeviceData.from_arrays(data.inputs["val"], device)
        fitted = fit_ensemble(
            members, val, cfg, lambda name: scale if name.startswith("backbone.") else 1.0
        )
        test = DeviceData.from_arrays(data.inputs["test"], device)
        outcomes = {}
        for seed in subsets:
            # the lr with the best validation score (ties: the first in cfg.lrs)
            result, lr, model = max(
                ((result, member.lr, model)
                 for member, (result, model) in zip(members, fitted, strict=True)
                 if member.seed == seed),
                key=lambda candidate: candidate[0].score,
            )  # fmt: skip
            test_acc = evaluate(model, test, 1024)["acc"]  # scored once, after the choice
            outcomes[seed] = Outcome(result.best_val_acc, test_acc,
                                     {"lr": lr, **starts[seed].hparams}, result.history,
                                     result.best_epoch)  # fmt: skip
        return outcomes

    return run


def _discriminative(cfg: FinetuneParams) -> float:
    return cfg.backbone_lr_scale


STRATEGIES: dict[str, Strategy] = {
    "scratch": _network(_scratch_start, lambda cfg: 1.0),
    "linear_probe": _linear_probe,
    "finetune": _network(_pretrained_start, _discriminative),
    "lp_ft": _network(_probed_start, _discriminative),
    "partial": _network(_pretrained_start, _discriminative, lambda cfg: cfg.freeze_blocks),
}


@dataclass(frozen=True)
class Group:
    """The unit of work: one strategy at one label fraction, every seed (trained together)."""

    strategy: str
    fraction: float
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Cell:
    """One finished grid cell: its line of the results table and the chosen run's epochs."""

    row: dict[str, Any]
    history: list[dict[str, float]]

    @property
    def key(self) -> tuple[str, float, int]:
        return self.row["strategy"], self.row["fraction"], self.row["seed"]


def train_group(data: TargetData, params: Params, group: Group) -> list[Cell]:
    """Train one group and return its cells; reads nothing but its arguments and writes
    nothing, so it runs the same in a thread, another process or on another machine."""
    device = runtime.configure(params.runtime)  # in a worker process, too
    cfg = params.finetune
    subsets = {seed: label_subset(data.inputs["train"].y, group.fraction, seed)
               for seed in group.seeds}  # fmt: skip
    outcomes = STRATEGIES[group.strategy](data, subsets, cfg, device)
    cells = []
    for seed in group.seeds:
        outcome = outcomes[seed]
        row = {
            "target": data.name, "strategy": group.strategy, "fraction": group.fraction,
            "seed": seed, "n_labels": len(subsets[seed]), "lr": np.nan, "l2": np.nan,
            "val_acc": outcome.val_acc, "test_acc": outcome.test_acc,
            "best_epoch": outcome.best_epoch, "epochs_run": len(outcome.history),
        } | outcome.hparams  # fmt: skip
        cells.append(Cell(row, outcome.history))
        log.info("%s %-12s fraction %-5g seed %d: %d labels, test acc %.4f", data.name,
                 group.strategy, group.fraction, seed, len(subsets[seed]),
                 outcome.test_acc)  # fmt: skip
    return cells


def load_target(target: str, layout: Layout) -> TargetData:
    return TargetData(
        name=target,
        inputs={s: load_split(layout.prepared(target), s) for s in SPLITS},
        features={s: load_split(layout.features(target), s) for s in SPLITS},
        num_classes=load_meta(layout.prepared(target))["num_classes"],
        checkpoint=load_checkpoint(layout.checkpoint),
        checkpoint_path=layout.checkpoint,
    )


class TargetGrid:
    """One target's grid as a driver runs it: the data, the groups still to train, and what
    becomes of their cells. The driver is this module's `finetune` (one group after another)
    or the Prefect flow (groups in parallel on its task runner); both end the same way."""

    def __init__(self, params: Params, target: str, layout: Layout):
        files.check_writable(layout.results(target).parent)
        self.target, self.layout = target, layout
        self.data = load_target(target, layout)
        self.progress = Progress(layout.finetune_progress(target),
                                 _fingerprint(params, target, layout))  # fmt: skip
        cfg = params.finetune
        strategies = sorted(cfg.strategies, key=lambda s: s != "scratch")  # the table's order
        self.order = [(strategy, fraction, seed) for strategy in strategies
                      for fraction in cfg.fractions for seed in cfg.seeds]  # fmt: skip
        # the groups not finished yet, the most labels (the longest) first: parallel workers
        # then end together rather than one waiting for the last big group
        self.groups = [
            Group(strategy, fraction, tuple(cfg.seeds))
            for fraction in sorted(cfg.fractions, reverse=True)
            for strategy in strategies
            if any((strategy, fraction, seed) not in self.progress.cells for seed in cfg.seeds)
        ]

    def stage_run(self, parent: Run) -> Run:
        """The target's MLflow stage run (open until `finish`)."""
        tags = {"stage": "finetune", "target": self.target}
        inputs = data_files(self.target, self.layout)
        return parent.child(f"finetune {self.target}", tags=tags, inputs=inputs)

    def add(self, cells: list[Cell]) -> None:
        """A finished group: kept in the progress file, so that a rerun does not redo it."""
        self.progress.add(cells)

    def finish(self, stage: Run) -> pd.DataFrame:
        """Record every cell in MLflow and write the results table (the grid must be done)."""
        cells = [self.progress.cells[key] for key in self.order]
        scratch = {(c.row["fraction"], c.row["seed"]): c.row["test_acc"]
                   for c in cells if c.row["strategy"] == "scratch"}  # fmt: skip
        inputs = data_files(self.target, self.layout)
        for cell in cells:
            gain = cell.row["test_acc"] - scratch[cell.row["fraction"], cell.row["seed"]]
            _record(stage, cell, gain, inputs)
        table = pd.DataFrame([c.row for c in cells], columns=RESULT_COLUMNS)
        files.write_text(self.layout.results(self.target), table.to_csv(index=False))
        self.progress.path.unlink(missing_ok=True)  # done: the next run starts afresh
        return table


def finetune(params: Params, target: str, layout: Layout, run: Run) -> pd.DataFrame:
    """Run the grid for one target, one group after another, and write its results table."""
    grid = TargetGrid(params, target, layout)
    with grid.stage_run(run) as stage:
        for group in grid.groups:
            grid.add(train_group(grid.data, params, group))
        return grid.finish(stage)


class Progress:
    """The grid cells finished so far, rewritten atomically after each group, so that a rerun
    after a crash redoes only the unfinished groups (each depends on nothing but its seeds and
    inputs, so the final table is the same as an uninterrupted run's)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.cells: dict[tuple[str, float, int], Cell] = {}
        saved = json.loads(path.read_text()) if path.exists() else {}
        if saved.get("fingerprint") == fingerprint:
            for cell in saved["cells"]:
                self._keep(Cell(cell["row"], cell["history"]))
            log.info("resuming %s: %d grid cells already finished", path, len(self.cells))

    def _keep(self, cell: Cell) -> None:
        self.cells[cell.key] = cell

    def add(self, cells: list[Cell]) -> None:
        for cell in cells:
            self._keep(cell)
        saved = [{"row": c.row, "history": c.history} for c in self.cells.values()]
        files.write_json(self.path, {"fingerprint": self.fingerprint, "cells": saved})


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


def _record(stage: Run, cell: Cell, gain: float, inputs: list[Path]) -> None:
    """One MLflow run per grid cell: filter on target and fraction to see transfer by scratch."""
    row = cell.row
    transfer = row["strategy"] != "scratch"
    name = f"{row['target']}/{row['strategy']}/f{row['fraction']:g}/s{row['seed']}"
    tags = {"target": row["target"], "strategy": row["strategy"],
            "kind": "transfer" if transfer else "scratch"}  # fmt: skip
    with stage.child(name, tags=tags, inputs=inputs) as child:
        keys = ["target", "strategy", "fraction", "seed", "n_labels"]
        chosen = [k for k in ("lr", "l2") if not pd.isna(row[k])]  # the hyperparameters it has
        child.log(
            params={k: row[k] for k in keys + chosen},
            # best/: the chosen epoch's; the history's val/acc shows the last epoch's in MLflow
            metrics={"best/val_acc": row["val_acc"], "test/acc": row["test_acc"]}
            | ({"gain_vs_scratch": gain} if transfer else {}),
        )
        child.log_history(cell.history)


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, finetune, argv, per_target=True)


if __name__ == "__main__":
    main()
