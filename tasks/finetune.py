"""Stage `finetune`: for one target, every source x transfer strategy x label budget x seed, and
scratch (once per target: the paired baseline of every source) at each label budget x seed.

Each run tunes its learning rate (or, for the probe, its L2 strength) on the validation split and
is scored on the test split once, after that choice. Rows go to data/results/<target>.csv.

The unit of work is a group: one source's strategies at every label budget and seed (scratch,
one baseline for all sources, goes with the first source's). The probe is solved once per label
subset (the linear_probe cell, and LP-FT's starting head), and every network run of the group,
each strategy x budget x seed x learning rate, trains in one vectorised ensemble
(tasks/learning/ensemble.py), on `runtime.threads` torch threads.
A group reads only the arrays it is given and writes nothing (`train_group`), so a driver can
run the groups anywhere. One driver (`Fanout`) hands them to a `submit` callable: threads of
this process, `flow.workers` groups side by side (`finetune`, what `dvc repro` runs), or the
Prefect flow's task runner, threads or Dask workers (flows/study.py). As each group comes back,
the driver keeps its cells (a rerun after a crash redoes only the others) and records them at
once, with the real start and end of their training and every learning rate's curve; a
target's table is written when its last group is back (`TargetGrid`).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from tasks.config.params import FinetuneParams, Params, ParamsError
from tasks.data.datasets import SPLITS, Labelled, load_meta, load_split
from tasks.data.subsets import Budget, label_subset, resolve_budgets
from tasks.frame import stage_command
from tasks.learning import runtime
from tasks.learning.augment import Augmented, build_augmentation
from tasks.learning.ensemble import Member, fit_ensemble
from tasks.learning.probe import ProbeResult, fit_probe
from tasks.learning.train import SUPERVISED, DeviceData, evaluate
from tasks.models.classifier import (
    VECTORISED,
    Classifier,
    arch_for,
    build_classifier,
    depth_below_head,
    freeze_lower,
    load_checkpoint,
    pretrained_classifier,
)
from tasks.models.frozen import UpperBlocks, frozen_states
from tasks.models.vision import stage_count
from tasks.recording.grid import GridRecords
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import contracts, files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    *("target", "source", "strategy", "budget", "seed", "n_labels", "per_class", "lr", "l2"),
    *("val_acc", "val_loss", "test_acc", "best_epoch", "epochs_run"),
]


@dataclass(frozen=True)
class TargetData:
    """What every run of one target reads, loaded once. Plain arrays and tensors: it is shipped
    as it is to a worker process (or machine) that trains a group of runs."""

    name: str  # the target's name in params
    source: str  # the source whose backbone the features and checkpoint are
    inputs: dict[str, Labelled]  # prepared splits: x (N, C, L)
    features: dict[str, Labelled]  # the source's frozen-backbone features: x (N, D)
    num_classes: int
    checkpoint: dict[str, Any]  # the pretrained payload (see tasks.models.classifier)
    checkpoint_path: Path  # named in error messages only


@dataclass(frozen=True)
class Curve:
    """One learning rate's run of a network cell, as trained (before the choice)."""

    lr: float
    history: list[dict[str, float]]  # per epoch: train/loss, val/loss, val/acc
    epoch_ends: list[float]  # when each epoch ended (time.time())
    best_epoch: int
    val_acc: float


@dataclass(frozen=True)
class Outcome:
    val_acc: float
    val_loss: float  # the chosen model's: it breaks ties of val_acc between strategies
    test_acc: float
    hparams: dict[str, float]  # the chosen lr or l2
    best_epoch: int = -1
    curves: list[Curve] = field(default_factory=list)  # every lr tried; the chosen one by hparams
    # training seconds: per run-epoch for a network cell (its ensemble's seconds over every
    # run-epoch the ensemble trained: its runs train together), per run for the probe (no
    # epochs); measured, not reproduced
    epoch_seconds: float = math.nan


def _fit_probe(data: TargetData, subset: np.ndarray, cfg: FinetuneParams) -> ProbeResult:
    def tensors(split: str, index: np.ndarray | slice = slice(None)):
        features = data.features[split]
        return torch.from_numpy(features.x[index]), torch.from_numpy(features.y[index])

    return fit_probe(
        tensors("train", subset), tensors("val"), tensors("test"), data.num_classes, cfg.probe_l2
    )


@dataclass(frozen=True)
class Start:
    """Where a network strategy starts from: a model, and the hyperparameters that made it."""

    model: Classifier
    hparams: dict[str, float] = field(default_factory=dict)


def _scratch_start(data: TargetData, seed: int, probe: ProbeResult | None) -> Start:
    arch = arch_for(data.checkpoint["arch"], data.inputs["train"].x.shape[1:])  # (C, L)
    return Start(build_classifier(arch, data.num_classes, seed))


def _pretrained_start(data: TargetData, seed: int, probe: ProbeResult | None) -> Start:
    shape = data.inputs["train"].x.shape[1:]  # (C, L): a fresh input layer if it differs
    return Start(
        pretrained_classifier(data.checkpoint, data.num_classes, seed, data.checkpoint_path, shape)
    )


def _probed_start(data: TargetData, seed: int, probe: ProbeResult | None) -> Start:
    """LP-FT's first step (Kumar et al. 2022): the linear probe's solution (of the same label
    subset, solved once for the linear_probe cell too) becomes the head."""
    start = _pretrained_start(data, seed, probe)
    with torch.no_grad():
        start.model.head.weight.copy_(probe.weight)
        start.model.head.bias.copy_(probe.bias)
    return Start(start.model, {"l2": probe.l2})


@dataclass(frozen=True)
class Network:
    """A strategy that trains a network: the same loop and lr grid for all, its own start,
    learning rates per layer (`rate_scales`) and frozen blocks."""

    start: Callable[[TargetData, int, ProbeResult | None], Start]
    transfer: bool = True  # pretrained layers at the discriminative rate
    frozen_blocks: Callable[[FinetuneParams], int] = lambda cfg: 0
    probed: bool = False  # starts from the probe of its label subset (else from its seed only)


PROBE = "linear_probe"  # logistic regression on the cached features; the seed draws the subset
NETWORKS: dict[str, Network] = {
    "scratch": Network(_scratch_start, transfer=False),
    "finetune": Network(_pretrained_start),
    "lp_ft": Network(_probed_start, probed=True),
    "partial": Network(_pretrained_start, frozen_blocks=lambda cfg: cfg.freeze_blocks),
}
STRATEGIES = (PROBE, *NETWORKS)

CellKey = tuple[str, str, int]  # (strategy, budget name, seed)


def rate_scales(model: Classifier, cfg: FinetuneParams, transfer: bool) -> dict[str, float]:
    """Each parameter's learning rate as a multiple of the run's lr. Transfer: pretrained layers
    at the discriminative rate (backbone_lr_scale), times layer_decay for each block down from
    the head (layer-wise decay: 1 leaves it off); the head and a fresh input layer learn from
    nothing, at the head's rate. Scratch: every parameter at the run's lr."""
    depths = depth_below_head(model)
    return {
        name: cfg.backbone_lr_scale * cfg.layer_decay ** depths[name]
        if transfer and name.startswith("backbone.") and name not in model.fresh
        else 1.0
        for name, _ in model.named_parameters()
    }


def _inputs_from_frozen(
    data: TargetData, starts: Iterable[Start], frozen: int, device: torch.device
) -> dict[str, Labelled]:
    """What a strategy's runs read: the target's inputs, or, for a text encoder with frozen
    lower blocks, their output computed once (tasks/models/frozen.py); the starts then run the
    blocks above from it. The frozen weights are the pretrained ones, the same at every seed."""
    starts = list(starts)
    encoder = starts[0].model.backbone
    if not frozen or not hasattr(encoder, "upper"):
        return data.inputs
    for begin in starts:
        begin.model.backbone = UpperBlocks(begin.model.backbone, frozen)
    return {
        split: Labelled(frozen_states(encoder.to(device), part.x, frozen, device), part.y)
        for split, part in data.inputs.items()
    }


@dataclass(frozen=True)
class _Plan:
    """A network cell before training: what each of its runs (one per lr) starts from."""

    network: Network
    start: Start
    train: DeviceData  # its label subset (shared by the cells of that subset)
    splits: dict[str, DeviceData]  # val and test (shared by the strategies that read them)
    seed: int


def train_cells(
    data: TargetData,
    strategies: Iterable[str],
    subsets: dict[tuple[str, int], np.ndarray],
    cfg: FinetuneParams,
    device: torch.device,
) -> dict[CellKey, Outcome]:
    """Every cell of `strategies` at the label subsets given by (budget name, seed).

    The probe is solved once per subset: it is the linear_probe cell and lp_ft's starting head.
    Each network cell tries every lr of `cfg.lrs`, chosen on validation; all of them, every
    network strategy's at every subset, train as one vectorised ensemble where the backbone
    allows it (tasks/learning/ensemble.py), else one cell's runs after another.

    A cell's `epoch_seconds`: its share of the training time per epoch. Runs that train
    together are charged by their optimizer steps (an epoch of 2,100 labels takes 33 steps of
    64, one of 21 labels one step), and lp_ft's epochs carry its probe's seconds too.
    """
    strategies = list(strategies)
    probes: dict[tuple[str, int], ProbeResult] = {}
    probe_seconds: dict[tuple[str, int], float] = {}
    if PROBE in strategies or "lp_ft" in strategies:
        for key, subset in subsets.items():
            started = time.perf_counter()
            probes[key] = _fit_probe(data, subset, cfg)
            probe_seconds[key] = time.perf_counter() - started
    outcomes = {
        (PROBE, *key): Outcome(
            probe.val_acc,
            probe.val_loss,
            probe.test_acc,
            {"l2": probe.l2},
            epoch_seconds=probe_seconds[key],
        )
        for key, probe in probes.items()
        if PROBE in strategies
    }
    plans = _plan_networks(data, strategies, subsets, probes, cfg, device)
    if not plans:
        return outcomes
    vectorise = data.checkpoint["arch"]["name"] in VECTORISED
    # one stack for every run; else one cell's runs at a time (a large model's copies are
    # made, trained and dropped a cell at a time)
    batches = [list(plans)] if vectorise else [[cell] for cell in plans]
    # images: the same augmentation for every network strategy
    shape = data.inputs["train"].x.shape[1:]
    transform = build_augmentation(cfg.augment, "finetune.augment", shape)
    for cells in batches:
        runs = {cell: _runs(plans[cell], cfg, transform) for cell in cells}
        members = [member for cell in cells for member in runs[cell]]
        started = time.perf_counter()
        fitted = fit_ensemble(members, cfg, vectorise)
        steps = sum(
            len(result.history) * _steps(len(member.train), cfg.batch_size)
            for member, (result, _) in zip(members, fitted, strict=True)
        )
        step_seconds = (time.perf_counter() - started) / max(steps, 1)
        fitted = iter(fitted)
        for cell in cells:
            tried = [(*next(fitted), member.lr) for member in runs[cell]]
            # the lr with the best validation score (ties: the first in cfg.lrs)
            result, model, lr = max(tried, key=lambda candidate: candidate[0].score)
            test = plans[cell].splits["test"]
            test_acc = evaluate(model, test, 1024)["acc"]  # scored once, after the choice
            curves = [
                Curve(lr_, r.history, r.epoch_ends, r.best_epoch, r.best_val_acc)
                for r, _, lr_ in tried
            ]
            epoch_seconds = step_seconds * _steps(len(plans[cell].train), cfg.batch_size)
            if cell[0] == "lp_ft":  # its probe, solved for it too, spread over its epochs
                epoch_seconds += probe_seconds[cell[1:]] / len(result.history)
            outcomes[cell] = Outcome(
                result.best_val_acc,
                result.best_val_loss,
                test_acc,
                {"lr": lr, **plans[cell].start.hparams},
                result.best_epoch,
                curves,
                epoch_seconds,
            )
    return outcomes


def _steps(labels: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of `labels` examples."""
    return -(-labels // batch_size)


def _plan_networks(
    data: TargetData,
    strategies: list[str],
    subsets: dict[tuple[str, int], np.ndarray],
    probes: dict[tuple[str, int], ProbeResult],
    cfg: FinetuneParams,
    device: torch.device,
) -> dict[CellKey, _Plan]:
    """Each network cell's start, training subset and splits, on the training device; a subset
    (and val and test) is put there once for every cell that reads it."""
    on_device: list[tuple[dict[str, Labelled], dict[str, DeviceData]]] = []  # inputs, splits
    trains: dict[tuple[int, bytes], DeviceData] = {}  # by (inputs, subset)
    plans = {}
    for strategy in (s for s in strategies if s in NETWORKS):
        network = NETWORKS[strategy]
        # one start per seed (per subset when it starts from the subset's probe)
        made: dict[tuple[int, tuple[str, int] | None], Start] = {}
        starts = {}
        for key in subsets:
            origin = (key[1], key if network.probed else None)
            if origin not in made:
                made[origin] = network.start(data, key[1], probes.get(key))
            starts[key] = made[origin]
        inputs = _inputs_from_frozen(data, made.values(), network.frozen_blocks(cfg), device)
        found = next((i for i, (seen, _) in enumerate(on_device) if seen is inputs), None)
        if found is None:
            found = len(on_device)
            splits = {s: DeviceData.from_arrays(inputs[s], device) for s in ("val", "test")}
            on_device.append((inputs, splits))
        splits = on_device[found][1]
        for (budget, seed), subset in subsets.items():
            train = trains.get((found, subset.tobytes()))
            if train is None:
                train = DeviceData.from_arrays(inputs["train"].take(subset), device)
                trains[found, subset.tobytes()] = train
            plans[strategy, budget, seed] = _Plan(
                network, starts[budget, seed], train, splits, seed
            )
    return plans


def _runs(plan: _Plan, cfg: FinetuneParams, transform: torch.nn.Module | None) -> list[Member]:
    """A network cell's runs, one per lr, each from its own copy of the start; `transform`
    augments its training images (None: none)."""
    objective = Augmented(SUPERVISED, transform, plan.seed) if transform else SUPERVISED
    runs = []
    for lr in cfg.lrs:
        model = copy.deepcopy(plan.start.model)
        freeze_lower(model, plan.network.frozen_blocks(cfg))
        for name, param in model.named_parameters():
            param.requires_grad_(param.requires_grad or name in model.fresh)
        rates = rate_scales(model, cfg, plan.network.transfer)
        runs.append(Member(model, plan.train, plan.splits["val"], lr, plan.seed, rates, objective))
    return runs


@dataclass(frozen=True)
class Group:
    """The unit of work: one source's strategies at every label budget and seed, trained
    together (their network runs as one vectorised ensemble). Scratch, one baseline for every
    source, goes with the first source's (its cells' source is "")."""

    source: str
    strategies: tuple[str, ...]
    budgets: tuple[Budget, ...]
    seeds: tuple[int, ...]

    @property
    def cells(self) -> list[tuple[str, str, str, int]]:
        """Its cells' keys, (source, strategy, budget, seed)."""
        return [
            ("" if strategy == "scratch" else self.source, strategy, budget.name, seed)
            for strategy in self.strategies
            for budget in self.budgets
            for seed in self.seeds
        ]


def grid_groups(
    sources: Iterable[str],
    strategies: Iterable[str],
    budgets: tuple[Budget, ...],
    seeds: tuple[int, ...],
    finished: set[tuple[str, str, str, int]],
) -> list[Group]:
    """A target's groups not `finished` yet (a cell key of every group's in it: done before a
    restart): each source's strategies, scratch with the first's."""
    transfer = tuple(s for s in strategies if s != "scratch")
    groups = [
        Group(source, ("scratch", *transfer) if i == 0 else transfer, budgets, seeds)
        for i, source in enumerate(sources)
    ]
    return [
        group
        for group in groups
        if group.strategies and any(key not in finished for key in group.cells)
    ]


@dataclass(frozen=True)
class Cell:
    """One finished grid cell: its line of the results table, the chosen run's epochs, every
    learning rate's curve, and when its group trained. Plain data: it is kept in the progress
    file as JSON and sent back from worker processes."""

    row: dict[str, Any]
    history: list[dict[str, float]]
    started: float  # time.time() when its group started and ended training
    ended: float
    epoch_ends: list[float] = field(default_factory=list)  # of the chosen run
    curves: list[dict[str, Any]] = field(default_factory=list)  # Curve fields, per lr tried
    # its share of its group's training seconds, per epoch of its runs (by their optimizer
    # steps: see `train_cells`), per run for the probe (no epochs); measured, not reproduced
    epoch_seconds: float = math.nan

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.row["source"], self.row["strategy"], self.row["budget"], self.row["seed"]


def train_group(data: TargetData, params: Params, group: Group) -> list[Cell]:
    """Train one group and return its cells; reads nothing but its arguments and writes
    nothing, so it runs the same in a thread, another process or on another machine."""
    started = time.time()
    device = runtime.configure(params.runtime)  # in a worker process, too
    budgets = {budget.name: budget for budget in group.budgets}
    subsets = {
        (budget.name, seed): label_subset(data.inputs["train"].y, budget.per_class, seed)
        for budget in group.budgets
        for seed in group.seeds
    }
    outcomes = train_cells(data, group.strategies, subsets, params.finetune, device)
    ended = time.time()
    cells = []
    for source, strategy, budget, seed in group.cells:
        outcome = outcomes[strategy, budget, seed]
        # the chosen lr's curve (the probe has none: it trains no epochs)
        chosen = next((c for c in outcome.curves if c.lr == outcome.hparams.get("lr")), None)
        row = {
            "target": data.name,
            "source": source,
            "strategy": strategy,
            "budget": budget,
            "seed": seed,
            "n_labels": len(subsets[budget, seed]),
            "per_class": budgets[budget].per_class_text,
            "lr": np.nan,
            "l2": np.nan,
            "val_acc": outcome.val_acc,
            "val_loss": outcome.val_loss,
            "test_acc": outcome.test_acc,
            "best_epoch": outcome.best_epoch,
            "epochs_run": len(chosen.history) if chosen else 0,
        } | outcome.hparams
        curves = [dataclasses.asdict(curve) for curve in outcome.curves]
        history, epoch_ends = (chosen.history, chosen.epoch_ends) if chosen else ([], [])
        cells.append(Cell(row, history, started, ended, epoch_ends, curves, outcome.epoch_seconds))
        log.info(
            "%s %-20s budget %-6s seed %d: %d labels, test acc %.4f",
            *(data.name, "/".join(filter(None, [source, strategy])), budget, seed),
            len(subsets[budget, seed]),
            outcome.test_acc,
        )
    return cells


def load_target(target: str, sources: Iterable[str], layout: Layout) -> dict[str, TargetData]:
    """The target's data with each source's features and checkpoint, by source (the
    prepared splits are read once and shared)."""
    inputs = {s: load_split(layout.prepared(target), s) for s in SPLITS}
    num_classes = load_meta(layout.prepared(target))["num_classes"]
    return {
        source: TargetData(
            name=target,
            source=source,
            inputs=inputs,
            features={s: load_split(layout.features(target, source), s) for s in SPLITS},
            num_classes=num_classes,
            checkpoint=load_checkpoint(layout.checkpoint(source)),
            checkpoint_path=layout.checkpoint(source),
        )
        for source in sources
    }


class TargetGrid:
    """One target's grid: its data, the groups still to train, and what becomes of their cells:
    kept in the progress file and recorded as they come back, then the results table."""

    def __init__(self, params: Params, target: str, layout: Layout):
        files.check_writable(layout.results(target).parent)
        self.target, self.layout = target, layout
        self.data = load_target(target, params.sources, layout)
        self.inputs = data_files(target, params.sources, layout)
        # a saved progress file is resumed only by a run of the same declared deps (dvc.yaml)
        fingerprint = contracts.fingerprint("finetune", params, layout.root, target)
        self.progress = Progress(layout.finetune_progress(target), fingerprint)
        cfg = params.finetune
        # scratch builds the sources' common architecture (params.model): the first's says it
        self.baseline = self.data[next(iter(params.sources))]
        arch = self.baseline.checkpoint["arch"]
        if arch["name"] == "timm":  # its stages are known once built (the flow checked before)
            try:
                cfg.check_partial(stage_count(arch["architecture"], arch["args"]))
            except ValueError as err:
                raise ParamsError(str(err)) from err
        budgets, notes = resolve_budgets(self.baseline.inputs["train"].y, cfg.fractions, cfg.shots)
        budgets, seeds = tuple(budgets), tuple(cfg.seeds)
        for note in notes:  # the report repeats them
            log.warning("%s: %s", target, note)
        # the table's order: scratch, then each source's transfer strategies
        arms = [("", "scratch")] + [
            (source, strategy)
            for source in params.sources
            for strategy in cfg.strategies
            if strategy != "scratch"
        ]
        self.order = [
            (source, strategy, budget.name, seed)
            for source, strategy in arms
            for budget in budgets
            for seed in cfg.seeds
        ]
        self.groups = grid_groups(
            params.sources, cfg.strategies, budgets, seeds, set(self.progress.cells)
        )
        # the grid's records, under the target's stage record once `open` (none before)
        self.records = GridRecords(Recorder(), self.inputs, cfg.freeze_blocks)
        self.batch_size = cfg.batch_size  # what a run's epoch costs in steps

    def data_for(self, group: Group) -> TargetData:
        """What a group reads: its source's features and checkpoint (scratch, with the first
        source, builds the sources' common architecture)."""
        return self.data[group.source]

    def open(self, parent: Recorder) -> None:
        """Open the target's stage record under `parent`, and record the cells a stopped
        execution finished before (resumed from the progress file)."""
        tags = stage_tags("finetune", target=self.target)
        self.records.stage = parent.child(f"finetune {self.target}", tags=tags, inputs=self.inputs)
        self.records.add(list(self.progress.cells.values()))

    def add(self, cells: list[Cell]) -> None:
        """A finished group: kept in the progress file (a rerun does not redo it) and recorded."""
        self.progress.add(cells)
        self.records.add(cells)

    def finish(self) -> pd.DataFrame:
        """Write the results table (the grid must be done) and forget the progress file."""
        cells = [self.progress.cells[key] for key in self.order]
        table = pd.DataFrame([c.row for c in cells], columns=RESULT_COLUMNS)
        files.write_json(self.layout.curves(self.target), [self._curve(c) for c in cells])
        seconds = [{**_cell_key(c), "epoch_seconds": c.epoch_seconds} for c in cells]
        files.write_json(self.layout.finetune_seconds(self.target), seconds)
        files.write_text(self.layout.results(self.target), table.to_csv(index=False))
        self.progress.path.unlink(missing_ok=True)  # done: the next run starts afresh
        return table

    def _curve(self, cell: Cell) -> dict[str, Any]:
        """What the compute table reads of a cell (with its seconds, kept apart): its chosen
        run's validation accuracy per epoch, and the optimizer steps of an epoch."""
        row = cell.row
        return {
            **_cell_key(cell),
            "n_labels": row["n_labels"],
            "val_acc": row["val_acc"],
            "val_acc_curve": [epoch["val/acc"] for epoch in cell.history],
            "steps_per_epoch": _steps(row["n_labels"], self.batch_size) if cell.history else 0,
        }


def _cell_key(cell: Cell) -> dict[str, Any]:
    return dict(zip(("source", "strategy", "budget", "seed"), cell.key, strict=True))


class Future(Protocol):
    def result(self) -> list[Cell]: ...


Submit = Callable[[TargetData, Group], Future]  # start training a group somewhere
Wait = Callable[[list[Future]], Iterator[Future]]  # futures in the order they finish


class Fanout:
    """The one fine-tuning driver. Groups go to `submit` (a thread, Prefect's task runner, Dask
    workers); each that comes back is kept and recorded at once, whatever its target, and a
    target is finished (its table, and `on_finished`, e.g. recording it in DVC) when its last
    group is back. A failed target does not stop the others."""

    def __init__(
        self,
        submit: Submit,
        wait: Wait = concurrent.futures.as_completed,
        on_finished: Callable[[str], None] = lambda target: None,
    ):
        self.submit, self.wait, self.on_finished = submit, wait, on_finished
        self.grids: dict[str, TargetGrid] = {}
        self.owner: dict[Future, str] = {}
        self.left: dict[str, int] = {}
        self.errors: dict[str, Exception] = {}
        self.tables: dict[str, pd.DataFrame] = {}

    def add(self, grid: TargetGrid, parent: Recorder) -> None:
        """Open the grid's records and submit its groups."""
        grid.open(parent)
        self.grids[grid.target] = grid
        self.left[grid.target] = len(grid.groups)
        for group in grid.groups:
            self.owner[self.submit(grid.data_for(group), group)] = grid.target
        if not grid.groups:  # every group was done before a restart
            self._finish(grid.target)

    def fail(self, target: str, err: Exception) -> None:
        """A target that failed before its groups were submitted (e.g. extraction)."""
        self.errors.setdefault(target, err)

    def collect(self) -> dict[str, Exception]:
        """Wait for every group; returns each failed target's first error."""
        for future in self.wait(list(self.owner)):
            target = self.owner[future]
            try:
                self.grids[target].add(future.result())
            except Exception as err:
                self.errors.setdefault(target, err)
            self.left[target] -= 1
            if self.left[target] == 0:
                self._finish(target)
        return dict(self.errors)

    def _finish(self, target: str) -> None:
        grid = self.grids[target]
        try:
            with grid.records.stage:  # FAILED if a group failed
                if target in self.errors:
                    raise self.errors[target]
                self.tables[target] = grid.finish()
            self.on_finished(target)
        except Exception as err:
            self.errors.setdefault(target, err)


def finetune(params: Params, target: str, layout: Layout, recorder: Recorder) -> pd.DataFrame:
    """Run the grid for one target and write its results table: `flow.workers` groups side by
    side in threads, as the flow runs them (the same results: each group's numbers are its
    own), each recorded as it finishes."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=params.flow.workers)
    try:
        fanout = Fanout(lambda data, group: pool.submit(train_group, data, params, group))
        fanout.add(TargetGrid(params, target, layout), recorder)
        errors = fanout.collect()
    finally:  # stopped (Ctrl-C) or failed: do not wait for the group in training
        pool.shutdown(wait=False, cancel_futures=True)
    if errors:
        raise errors[target]
    return fanout.tables[target]


class Progress:
    """The grid cells finished so far, rewritten atomically after each group, so that a rerun
    after a crash redoes only the unfinished groups (each depends on nothing but its seeds and
    inputs, so the final table is the same as an uninterrupted run's)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.cells: dict[tuple[str, str, str, int], Cell] = {}
        saved = _read_json(path)
        if saved.get("fingerprint") == fingerprint:
            self._keep(Cell(**cell) for cell in saved["cells"])
            log.info("resuming %s: %d grid cells already finished", path, len(self.cells))

    def _keep(self, cells: Iterable[Cell]) -> None:
        for cell in cells:
            self.cells[cell.key] = cell

    def add(self, cells: list[Cell]) -> None:
        self._keep(cells)
        saved = [dataclasses.asdict(c) for c in self.cells.values()]
        files.write_json(self.path, {"fingerprint": self.fingerprint, "cells": saved})


def _read_json(path: Path) -> dict[str, Any]:
    """A progress file, or nothing when there is none or it cannot be read (start afresh)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def data_files(target: str, sources: Iterable[str], layout: Layout) -> list[Path]:
    """The files a target's grid reads: its splits, and each source's features of them and
    checkpoint."""
    inputs = [layout.prepared(target) / f"{s}.npz" for s in SPLITS]
    for source in sources:
        inputs += [layout.features(target, source) / f"{s}.npz" for s in SPLITS]
        inputs.append(layout.checkpoint(source))
    return inputs


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, finetune, argv, per="target")


if __name__ == "__main__":
    main()
