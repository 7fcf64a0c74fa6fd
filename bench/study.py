"""The default study's fine-tuning grid, ours (`tasks.finetune.finetune`, the `finetune` stage)
against two hand-written peers, a fair one and a naive one, side by side: wall times and ratios,
test accuracies, and each side's arithmetic rate against the machine's matmul rate.

    python bench/study.py [--targets new_classes] [--strategies scratch,finetune]
                          [--fractions 0.01,1.0] [--seeds 0,1,2]
                          [--sides ours,fair,naive] [--reps 1]

It reads the default study's prepared data, features and checkpoint under data/ (run
`dvc repro` or `python -m flows.pipeline` first) and writes nothing there: every side works in a
temporary folder, each with its own temporary sqlite MLflow store.

Ours: the stage function, called per target with a real MLflow parent run (as `tasks.frame`
creates one), exactly as the pipeline runs it (its results and progress files go to the
temporary folder). It is timed at the params' setting (`runtime.threads` torch threads per group,
`flow.workers` groups side by side) and with all the cores in one group's threads (`ours@2x1`
on 2 cores: a one-source grid is one group a target, and 1 x 2 leaves a core idle there); the
ratios take the faster, as they take the fair peer's faster thread setting.

Both peers follow our protocol: the same grid (params.yaml's `finetune` section, narrowed by
the options), the same label subsets (`tasks.data.subsets.label_subset`) and seeds, the same
model inits (`tasks.models.classifier`), Adam (weight_decay from params) with the same
learning-rate grid chosen on validation (accuracy, ties to the lower loss, then to the first
lr), the same max epochs, patience and best-weights early stopping on validation accuracy, the
same strategies (scratch; finetune, lp_ft and partial with the backbone at lr *
`backbone_lr_scale`, partial with the first `freeze_blocks` backbone blocks frozen;
linear_probe). They train their runs one after another in one process, and record one MLflow
run per grid cell (its parameters, then its test accuracy) nested under a parent run. They
implement neither `layer_decay` nor `augment` (refused unless off). The grid loop, the inits,
the optimizer and the early-stopping rule are shared; each peer trains, scores, logs and probes
its own way:

The fair peer, what a competent PyTorch user writes: the target's splits go to the device as
tensors once; each run indexes its training subset there and batches it by a seeded
`torch.randperm` per epoch (our data order), no DataLoader; its training loss and its
validation and test scores (batches of 1,024 under `no_grad`) are summed on the device and read
once per epoch or evaluation; one `mlflow.log_metrics` call per epoch. Its linear probe (and
LP-FT's head) is scikit-learn's `LogisticRegression` (L-BFGS, multinomial) on the features
standardised by the training subset's statistics, with C = 1 / (l2 * n_train), our objective
(mean cross-entropy + l2/2 |W|^2) scaled; the l2 is chosen on validation accuracy (ties to the
stronger, as ours), and each (budget, seed)'s probe is computed once for linear_probe and lp_ft.
It is timed at 1 intra-op thread and at os.cpu_count(): the ratio takes the faster (its best
setting), and the other time is printed too.

The naive peer, a user following the classic PyTorch tutorial: per run a `TensorDataset` +
`DataLoader(shuffle=True, batch_size)` (seeded), `mlflow.log_metric` on every step and for
each epoch's validation scores, validation and test scored in batches of 1,024 through a
DataLoader with a host read per batch, at the stage's threads (`runtime.threads`). Its probe is
ours (`tasks.learning.probe.fit_probe`), computed again for every lp_ft cell: the probe does
not flatter our ratio. Its data order differs from ours (the DataLoader draws a seed from the
generator first), so accuracies agree in distribution, not bit for bit; the fair peer's data
order is ours, but its runs round differently from our stacked ensemble. All are compared
against the spread over seeds.

The limit: the fair peer counts its work per grid cell: the training examples of every step
and the evaluated examples (every epoch's validation, the test split once), over every lr's
run. `torch.utils.flop_counter.FlopCounterMode` counts, for each network strategy's model, one
training step's FLOPs (forward and backward at `batch_size`: partial's frozen blocks take no
backward) and one evaluation batch's, per example; the grid's FLOPs are the work times those.
FlopCounterMode counts matrix products and convolutions only (not elementwise ops or the
optimizer's update), and the probe is left out: a lower bound. Ours runs the same protocol, but
its early stopping may end a run a few epochs apart from the peer's, so the count is of the fair
peer's work (the naive peer's without it), used for every side. The matmul rate is the best of
10 float32 2048 x 2048 products on the device at os.cpu_count() threads; each side's rate is
grid FLOPs / its seconds, printed with its fraction of the matmul rate.

Timed: the grid only, from loading the target's files to the last MLflow record; creating each
store and parent run is not timed. With `--reps` above 1 the sides are repeated alternately and
the median of each is reported.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from _common import machine, require_inputs, timed
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from tasks.config.params import FinetuneParams, Params, load_params
from tasks.data.datasets import SPLITS, Labelled, load_meta, load_split
from tasks.data.subsets import Budget, label_subset, resolve_budgets
from tasks.finetune import finetune
from tasks.learning.probe import ProbeResult, fit_probe
from tasks.learning.runtime import configure, resolve_device
from tasks.models.classifier import (
    Classifier,
    arch_for,
    build_classifier,
    load_checkpoint,
    pretrained_classifier,
)
from tasks.recording.tracking import start_pipeline_run
from tasks.workspace.layout import Layout

EVAL_BATCH = 1024
SIDES = ("ours", "fair", "naive")
MATMUL_SIZE = 2048


# ---- what both peers share: the target's files, inits, optimizer, early stopping, grid loop


@dataclass(frozen=True)
class Target:
    """One target's files, loaded once (arrays in memory)."""

    name: str
    inputs: dict[str, Labelled]  # prepared splits: x (N, C, L)
    features: dict[str, Labelled]  # the source's frozen-backbone features: x (N, D)
    num_classes: int
    checkpoint: dict[str, Any]
    checkpoint_path: Path
    device: torch.device  # where the networks train


def load_target(params: Params, target: str, layout: Layout, device: torch.device) -> Target:
    """The target's files, with the study's one source's features and checkpoint (see main)."""
    source = next(iter(params.sources))
    return Target(
        name=target,
        inputs={s: load_split(layout.prepared(target), s) for s in SPLITS},
        features={s: load_split(layout.features(target, source), s) for s in SPLITS},
        num_classes=load_meta(layout.prepared(target))["num_classes"],
        checkpoint=load_checkpoint(layout.checkpoint(source)),
        checkpoint_path=layout.checkpoint(source),
        device=device,
    )


def start_model(strategy: str, data: Target, seed: int, head: ProbeResult | None) -> Classifier:
    """The strategy's initial model, built as the stage builds it (same seeded init); `head`,
    LP-FT's probe, becomes the head."""
    shape = data.inputs["train"].x.shape[1:]  # (C, L)
    if strategy == "scratch":
        arch = arch_for(data.checkpoint["arch"], shape)
        return build_classifier(arch, data.num_classes, seed)
    model = pretrained_classifier(
        data.checkpoint, data.num_classes, seed, data.checkpoint_path, shape
    )
    if head is not None:
        with torch.no_grad():
            model.head.weight.copy_(head.weight)
            model.head.bias.copy_(head.bias)
    return model


def network(
    begin: Classifier, strategy: str, cfg: FinetuneParams, lr: float, device: torch.device
) -> tuple[Classifier, torch.optim.Adam]:
    """A run's own copy of `begin` on the device, partial's blocks frozen, and its Adam: the
    backbone of a pretrained start at lr * backbone_lr_scale, the head at lr."""
    model = copy.deepcopy(begin).to(device)
    frozen = cfg.freeze_blocks if strategy == "partial" else 0
    model.backbone.blocks[:frozen].requires_grad_(False)
    scale = 1.0 if strategy == "scratch" else cfg.backbone_lr_scale
    optimizer = torch.optim.Adam(
        [
            {
                "params": [p for p in model.backbone.parameters() if p.requires_grad],
                "lr": lr * scale,
            },
            {"params": model.head.parameters(), "lr": lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    return model, optimizer


# One lr's run, the peer's way: each next() trains, validates and logs one more epoch and gives
# its (validation loss, validation accuracy).
Epochs = Iterator[tuple[float, float]]


@dataclass(frozen=True)
class Fitted:
    score: tuple[float, float]  # the best epoch's (val acc, -val loss): what selection maximises
    best_epoch: int
    epochs: int  # epochs trained


def early_stopped(model: nn.Module, epochs: Epochs, cfg: FinetuneParams) -> Fitted:
    """Train until validation accuracy has not improved for `patience` epochs (ties to the lower
    loss), and leave the best epoch's weights in `model`."""
    top, top_epoch, top_state, trained = (-1.0, -float("inf")), -1, None, 0
    for epoch in range(cfg.max_epochs):
        if epoch - 1 - top_epoch >= cfg.patience:
            break  # the stage's rule: no better val accuracy for `patience` epochs
        val_loss, val_acc = next(epochs)
        trained += 1
        if (val_acc, -val_loss) > top:
            top, top_epoch = (val_acc, -val_loss), epoch
            top_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(top_state)
    return Fitted(top, top_epoch, trained)


# a linear probe's cell trains no network: the work the FLOP count multiplies is nil
NO_NETWORK = {"epochs": 0, "steps": 0, "train_examples": 0, "eval_examples": 0}


class Peer(ABC):
    """A hand-written side: the protocol's grid cell (shared), with the training, scoring,
    logging and probe its own."""

    title: ClassVar[str]  # how the output names it

    def __init__(self, data: Target, cfg: FinetuneParams):
        self.data, self.cfg = data, cfg

    @abstractmethod
    def probe(self, budget: Budget, seed: int, subset: np.ndarray) -> ProbeResult:
        """The linear probe on the frozen features of `subset`, its l2 chosen on validation."""

    @abstractmethod
    def epochs(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr: float,
        subset: np.ndarray,
        seed: int,
    ) -> Epochs:
        """One lr's run on the training `subset`, with data order seeded by `seed`."""

    @abstractmethod
    def test_acc(self, model: nn.Module) -> float:
        """The chosen model's test accuracy."""

    def cell(self, strategy: str, budget: Budget, seed: int, subset: np.ndarray) -> dict[str, Any]:
        """One grid cell's row: its choice, scores and work (see NO_NETWORK)."""
        if strategy == "linear_probe":
            result = self.probe(budget, seed, subset)
            scores = {"l2": result.l2, "val_acc": result.val_acc, "test_acc": result.test_acc}
            return scores | NO_NETWORK
        head = self.probe(budget, seed, subset) if strategy == "lp_ft" else None
        begin = start_model(strategy, self.data, seed, head)
        best: tuple[Fitted, float, nn.Module] | None = None
        epochs = 0
        for lr in self.cfg.lrs:
            model, optimizer = network(begin, strategy, self.cfg, lr, self.data.device)
            fitted = early_stopped(
                model, self.epochs(model, optimizer, lr, subset, seed), self.cfg
            )
            epochs += fitted.epochs
            if best is None or fitted.score > best[0].score:  # ties: the first lr
                best = (fitted, lr, model)
        fitted, lr, model = best
        n_val, n_test = len(self.data.inputs["val"]), len(self.data.inputs["test"])
        return {
            "lr": lr,
            "val_acc": fitted.score[0],
            "test_acc": self.test_acc(model),
            "best_epoch": fitted.best_epoch,
            # the work of every lr's run: each epoch takes the whole subset, in
            # ceil(n / batch_size) steps, and scores validation; the chosen model scores test
            "epochs": epochs,
            "steps": epochs * -(-len(subset) // self.cfg.batch_size),
            "train_examples": epochs * len(subset),
            "eval_examples": epochs * n_val + n_test,
        }


def run_grid(params: Params, peer: Peer) -> pd.DataFrame:
    """The whole grid of one target, one nested MLflow run per grid cell."""
    cfg, data = params.finetune, peer.data
    labels = data.inputs["train"].y
    budgets, _ = resolve_budgets(labels, cfg.fractions, cfg.shots)
    rows = []
    for strategy in cfg.strategies:
        for budget in budgets:
            for seed in cfg.seeds:
                subset = label_subset(labels, budget.per_class, seed)
                key = {"target": data.name, "strategy": strategy, "budget": budget.name}
                name = f"{data.name}/{strategy}/{budget.name}/s{seed}"
                with mlflow.start_run(run_name=name, nested=True):
                    mlflow.log_params(key | {"seed": seed, "n_labels": len(subset)})
                    row = peer.cell(strategy, budget, seed, subset)
                    mlflow.log_metric("test_acc", row["test_acc"])
                rows.append(key | {"seed": seed} | row)
    return pd.DataFrame(rows)


# ---- the naive peer: the classic tutorial


def loader(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None) -> DataLoader:
    """The tutorial's DataLoader; shuffled (from a seeded generator) when `seed` is given."""
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    if seed is None:
        return DataLoader(dataset, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


@torch.no_grad()
def score(model: nn.Module, batches: DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a DataLoader, read batch by batch."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return loss / count, correct / count


class Naive(Peer):
    """Per run a DataLoader; every step logged; batches move to the device as in the tutorial."""

    title = "naive"

    def __init__(self, data: Target, cfg: FinetuneParams):
        super().__init__(data, cfg)
        self.val = loader(data.inputs["val"].x, data.inputs["val"].y, EVAL_BATCH)
        self.test = loader(data.inputs["test"].x, data.inputs["test"].y, EVAL_BATCH)

    def probe(self, budget: Budget, seed: int, subset: np.ndarray) -> ProbeResult:
        """The stage's L-BFGS probe (the same solver as ours), computed anew at every call."""

        def split(
            name: str, index: np.ndarray | slice = slice(None)
        ) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.data.features[name]
            return torch.from_numpy(features.x[index]), torch.from_numpy(features.y[index])

        return fit_probe(
            split("train", subset),
            split("val"),
            split("test"),
            self.data.num_classes,
            self.cfg.probe_l2,
        )

    def epochs(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr: float,
        subset: np.ndarray,
        seed: int,
    ) -> Epochs:
        train = loader(
            self.data.inputs["train"].x[subset],
            self.data.inputs["train"].y[subset],
            self.cfg.batch_size,
            seed,
        )
        device, step = self.data.device, 0
        for epoch in range(self.cfg.max_epochs):
            model.train()
            for xb, yb in train:
                xb, yb = xb.to(device), yb.to(device)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                mlflow.log_metric(f"train_loss_lr{lr:g}", loss.item(), step=step)
                step += 1
            val_loss, val_acc = score(model, self.val, device)
            mlflow.log_metric(f"val_loss_lr{lr:g}", val_loss, step=epoch)
            mlflow.log_metric(f"val_acc_lr{lr:g}", val_acc, step=epoch)
            yield val_loss, val_acc

    def test_acc(self, model: nn.Module) -> float:
        return score(model, self.test, self.data.device)[1]


# ---- the fair peer: what a competent PyTorch user writes


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of device tensors, in batches of EVAL_BATCH; the sums stay
    on the device and are read once."""
    model.eval()
    loss_sum = torch.zeros((), device=y.device, dtype=torch.float64)
    correct = torch.zeros((), device=y.device, dtype=torch.int64)
    for start in range(0, len(y), EVAL_BATCH):
        logits, labels = model(x[start : start + EVAL_BATCH]), y[start : start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    loss, hits = torch.stack([loss_sum, correct.double()]).tolist()
    return loss / len(y), hits / len(y)


def sklearn_probe(
    features: dict[str, Labelled], subset: np.ndarray, num_classes: int, l2_grid: list[float]
) -> ProbeResult:
    """scikit-learn's logistic regression on standardised features, for each l2 of the grid;
    the l2 chosen on validation accuracy, the choice scored on test, and returned as a
    classifier of the raw features (what LP-FT's head takes)."""
    x_train, y_train = features["train"].x[subset], features["train"].y[subset]
    # the training subset's statistics (never val's or test's), as ours standardises
    scaler = StandardScaler().fit(x_train)
    x_train, x_val, x_test = (
        scaler.transform(x) for x in (x_train, features["val"].x, features["test"].x)
    )
    y_val, y_test = features["val"].y, features["test"].y
    best: tuple[float, float, LogisticRegression] | None = None
    scores = {}
    # strongest first, the first best kept: ties go to the stronger l2, as in ours
    for l2 in sorted(l2_grid, reverse=True):
        # sklearn minimises C * sum(CE) + |W|^2 / 2: ours, mean(CE) + l2/2 |W|^2, times
        # 1 / l2 when C = 1 / (l2 n). lbfgs fits the multinomial loss (sklearn's only one now)
        c = 1 / (l2 * len(y_train)) if l2 > 0 else np.inf
        fitted = LogisticRegression(C=c, solver="lbfgs", max_iter=500).fit(x_train, y_train)
        scores[l2] = fitted.score(x_val, y_val)
        if best is None or scores[l2] > best[1]:
            best = (l2, scores[l2], fitted)
    l2, val_acc, fitted = best
    val_loss = log_loss(y_val, fitted.predict_proba(x_val), labels=range(num_classes))
    weight, bias = fitted.coef_, fitted.intercept_  # (K, D), (K,)
    if num_classes == 2:  # sklearn keeps one logit z for two classes: (-z/2, z/2) is the same
        weight, bias = np.stack([-weight[0], weight[0]]) / 2, np.array([-bias[0], bias[0]]) / 2
    # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m): the same classifier on raw features
    raw_weight = weight / scaler.scale_
    raw_bias = bias - raw_weight @ scaler.mean_
    return ProbeResult(
        l2,
        val_acc,
        val_loss,
        fitted.score(x_test, y_test),
        scores,
        torch.tensor(raw_weight, dtype=torch.float32),
        torch.tensor(raw_bias, dtype=torch.float32),
    )


class Fair(Peer):
    """Device tensors batched by index, sums read once per epoch or evaluation, one MLflow call
    per epoch, scikit-learn's probe computed once per (budget, seed)."""

    title = "fair peer"

    def __init__(self, data: Target, cfg: FinetuneParams):
        super().__init__(data, cfg)
        # every split on the device, once per target: a run indexes its subset there
        self.splits = {
            split: (
                torch.from_numpy(part.x).to(data.device),
                torch.from_numpy(part.y).to(data.device),
            )
            for split, part in data.inputs.items()
        }
        self.probes: dict[tuple[str, int], ProbeResult] = {}

    def probe(self, budget: Budget, seed: int, subset: np.ndarray) -> ProbeResult:
        """linear_probe's and lp_ft's cells of a (budget, seed) take the same probe: once."""
        key = (budget.name, seed)
        if key not in self.probes:
            self.probes[key] = sklearn_probe(
                self.data.features, subset, self.data.num_classes, self.cfg.probe_l2
            )
        return self.probes[key]

    def epochs(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr: float,
        subset: np.ndarray,
        seed: int,
    ) -> Epochs:
        device, batch = self.data.device, self.cfg.batch_size
        x_all, y_all = self.splits["train"]
        index = torch.from_numpy(subset).to(device)
        x, y = x_all[index], y_all[index]
        order = torch.Generator().manual_seed(seed)  # this run's own data order
        for epoch in range(self.cfg.max_epochs):
            model.train()
            permutation = torch.randperm(len(y), generator=order).to(device)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, len(y), batch):
                idx = permutation[start : start + batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum.add_(loss.detach(), alpha=len(idx))
            val_loss, val_acc = evaluate(model, *self.splits["val"])
            train_loss = loss_sum.item() / len(y)
            mlflow.log_metrics(
                {
                    f"train_loss_lr{lr:g}": train_loss,
                    f"val_loss_lr{lr:g}": val_loss,
                    f"val_acc_lr{lr:g}": val_acc,
                },
                step=epoch,
            )
            yield val_loss, val_acc

    def test_acc(self, model: nn.Module) -> float:
        return evaluate(model, *self.splits["test"])[1]


# ---- the sides, timed


def workspace(folder: Path, data: Layout, targets: list[str], source: str) -> Layout:
    """A layout in `folder` that reads `data`'s inputs of `source` (linked) and writes its own
    results."""
    root = folder / "workspace"
    for target in targets:
        for origin, dest in (
            (data.prepared(target), Layout(root).prepared(target)),
            (data.features(target, source), Layout(root).features(target, source)),
        ):
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(origin.resolve(), target_is_directory=True)
    Layout(root).checkpoint(source).parent.mkdir(parents=True, exist_ok=True)
    Layout(root).checkpoint(source).symlink_to(data.checkpoint(source).resolve())
    Layout(root).results(targets[0]).parent.mkdir(parents=True)
    return Layout(root)


def run_ours(params: Params, targets: list[str], data: Layout) -> tuple[float, pd.DataFrame]:
    with tempfile.TemporaryDirectory(prefix="bench-study-ours-") as folder:
        layout = workspace(Path(folder), data, targets, next(iter(params.sources)))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        with start_pipeline_run(params.experiment, "bench", root=layout.root) as parent:
            started = time.perf_counter()
            tables = [finetune(params, target, layout, parent) for target in targets]
            elapsed = time.perf_counter() - started
    return elapsed, pd.concat(tables, ignore_index=True)


def run_peer(
    kind: type[Peer],
    params: Params,
    targets: list[str],
    data: Layout,
    threads: int | None = None,
) -> tuple[float, pd.DataFrame]:
    """A peer's grid over `targets`, timed, under a parent MLflow run of its own store; at the
    stage's threads (`runtime.threads`), or at `threads`, restored afterwards."""
    previous = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-study-peer-") as folder:
            mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
            mlflow.set_experiment(params.experiment)
            with mlflow.start_run(run_name=f"{kind.title} study"):
                device = configure(params.runtime)  # the stage's threads and device
                if threads is not None:
                    torch.set_num_threads(threads)
                started = time.perf_counter()
                tables = [
                    run_grid(
                        params, kind(load_target(params, target, data, device), params.finetune)
                    )
                    for target in targets
                ]
                elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return elapsed, pd.concat(tables, ignore_index=True)


# ---- the limit: the grid's FLOPs and the machine's matmul rate


def flops_per_example(data: Target, cfg: FinetuneParams, strategy: str) -> tuple[float, float]:
    """(training, evaluation) FLOPs per example of `strategy`'s network, as FlopCounterMode
    counts them: one step's forward and backward at `batch_size` (frozen blocks take no
    backward), and one evaluation batch's forward; per example, for the count is linear in
    the batch."""
    if strategy == "linear_probe":
        return 0.0, 0.0  # trains no network; the probe's solver is left out
    begin = start_model(strategy, data, seed=0, head=None)
    model, _ = network(begin, strategy, cfg, cfg.lrs[0], data.device)
    shape = data.inputs["train"].x.shape[1:]
    x = torch.zeros(cfg.batch_size, *shape, device=data.device)
    y = torch.zeros(cfg.batch_size, dtype=torch.int64, device=data.device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    train = counter.get_total_flops() / cfg.batch_size
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(EVAL_BATCH, *shape, device=data.device))
    return train, counter.get_total_flops() / EVAL_BATCH


def grid_flops(
    table: pd.DataFrame, per_example: dict[tuple[str, str], tuple[float, float]]
) -> float:
    """The FLOPs of a peer's grid: each cell's training and evaluated examples times the
    per-example FLOPs of its (target, strategy)."""
    return sum(
        row.train_examples * per_example[row.target, row.strategy][0]
        + row.eval_examples * per_example[row.target, row.strategy][1]
        for row in table.itertuples()
    )


def matmul_rate(device: torch.device, threads: int) -> float:
    """GFLOP/s of a float32 MATMUL_SIZE^2 matrix product at `threads`: the best of 10 after a
    warm-up (restoring the thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device) for _ in range(2))

        def product() -> None:
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()

        product()  # warm-up
        seconds = min(timed(product, 10))
    finally:
        torch.set_num_threads(previous)
    return 2 * MATMUL_SIZE**3 / seconds / 1e9


# ---- output


def accuracy_lines(ours: pd.DataFrame, peer: pd.DataFrame, name: str) -> list[str]:
    """Per strategy and overall: mean test accuracy of ours and of the peer `name`, and the
    seeds' spread (the standard deviation over seeds of the per-seed mean over targets and
    fractions)."""
    lines = []
    groups = [(s, ours.strategy == s, peer.strategy == s) for s in ours.strategy.unique()]
    groups.append(("all", ours.strategy.notna(), peer.strategy.notna()))
    for group, mine, theirs in groups:
        seeds = {
            side: table[rows].groupby("seed").test_acc.mean()
            for side, table, rows in (("ours", ours, mine), (name, peer, theirs))
        }
        gap = seeds["ours"].mean() - seeds[name].mean()
        line = (
            f"{group:>13}: ours {seeds['ours'].mean():.4f} ± {seeds['ours'].std():.4f}, {name} "
            f"{seeds[name].mean():.4f} ± {seeds[name].std():.4f}  (difference {gap:+.4f}"
        )
        if len(seeds["ours"]) < 2:  # one seed has no spread to compare against
            lines.append(f"{line}; one seed: no spread to judge it by)")
            continue
        spread = max(s.std() for s in seeds.values())
        verdict = "within" if abs(gap) <= spread else "BEYOND"
        lines.append(f"{line}, {verdict} the seeds' spread {spread:.4f})")
    return lines


NAMES = {"fair": "fair peer", "naive": "naive"}  # the peers, as the output names them


def ours_settings(params: Params) -> list[tuple[int, int]]:
    """Ours' (torch threads, groups side by side): the params' own, and all the cores in one
    group's threads. A one-source grid is one group a target, so the params' 1 x 2 leaves a
    core idle there, while a study of several sources fills both."""
    cores = os.cpu_count() or 1
    own = (params.runtime.threads, params.flow.workers)
    return [own] if own == (cores, 1) else [own, (cores, 1)]


def sides_to_time(
    sides: list[str], params: Params, targets: list[str], data: Layout
) -> dict[str, Callable[[], tuple[float, pd.DataFrame]]]:
    """Each timed side by label, in the order asked; ours once per setting (`ours@TxW`: T torch
    threads, W groups side by side; `ours_settings`), the fair peer once per thread setting
    (`fair@N`: at N intra-op threads), 1 and all the cores."""
    runs: dict[str, Callable[[], tuple[float, pd.DataFrame]]] = {}
    for side in sides:
        if side == "ours":
            for threads, workers in ours_settings(params):
                setting = params.model_copy(
                    update={
                        "runtime": params.runtime.model_copy(update={"threads": threads}),
                        "flow": params.flow.model_copy(update={"workers": workers}),
                    }
                )
                runs[f"ours@{threads}x{workers}"] = lambda p=setting: run_ours(p, targets, data)
        elif side == "naive":
            runs["naive"] = lambda: run_peer(Naive, params, targets, data)
        else:
            for threads in sorted({1, os.cpu_count() or 1}):
                runs[f"fair@{threads}"] = lambda n=threads: run_peer(
                    Fair, params, targets, data, n
                )
    return runs


def ratio_lines(seconds: dict[str, float], fair: list[str], ours: list[str]) -> list[str]:
    """Each peer's median time over ours; each at its best setting (`seconds["fair"]`,
    `seconds["ours"]`), with every setting's time."""
    lines = [
        "ours at "
        + ", ".join(f"{label.removeprefix('ours@')} {seconds[label]:.1f} s" for label in ours)
        + " (torch threads x groups side by side): the ratios take the faster"
    ]
    if "fair" in seconds:
        lines.append(
            f"fair peer / ours: {seconds['fair'] / seconds['ours']:.2f}x  (goal: at least 5x)"
        )
        settings = ", ".join(
            f"{label.removeprefix('fair@')} thread(s) {seconds[label]:.1f} s "
            f"({seconds[label] / seconds['ours']:.2f}x)"
            for label in fair
        )
        lines.append(f"  fair peer at {settings}: the ratio takes the faster")
    if "naive" in seconds:
        lines.append(f"naive / ours: {seconds['naive'] / seconds['ours']:.2f}x")
    return lines


def limit_lines(
    params: Params,
    targets: list[str],
    data: Layout,
    tables: dict[str, pd.DataFrame],
    seconds: dict[str, float],
) -> list[str]:
    """The grid's FLOPs (of the fair peer's work, else the naive one's), the matmul rate, and
    each timed side's rate and fraction of it."""
    counted = next((peer for peer in ("fair", "naive") if peer in tables), None)
    if counted is None:
        return ["FLOPs: not counted (they count a peer's work: add fair to --sides)"]
    cfg, table = params.finetune, tables[counted]
    device = resolve_device(params.runtime.device)
    per_example: dict[tuple[str, str], tuple[float, float]] = {}
    for target in targets:
        files = load_target(params, target, data, device)
        for strategy in cfg.strategies:
            per_example[target, strategy] = flops_per_example(files, cfg, strategy)
    flops = grid_flops(table, per_example)
    lines = [
        f"  {target}/{strategy}: {train:,.0f} FLOPs per training example, "
        f"{evaluated:,.0f} per evaluated example"
        for (target, strategy), (train, evaluated) in per_example.items()
        if strategy != "linear_probe"
    ]
    lines.append(
        f"grid: {flops / 1e9:.1f} GFLOP, counted of the work the {NAMES[counted]} did "
        f"({table.train_examples.sum():,} training and {table.eval_examples.sum():,} evaluated "
        "examples; matmuls and convolutions only, the probe left out); ours runs the same "
        "protocol, but its early stopping may differ by a few epochs"
    )
    cores = os.cpu_count() or 1
    rate = matmul_rate(device, cores)
    lines.append(
        f"matmul: {rate:.1f} GFLOP/s ({MATMUL_SIZE}^2 float32 on {device}, {cores} thread(s))"
    )
    for label, elapsed in seconds.items():
        achieved = flops / elapsed / 1e9
        lines.append(
            f"{label:>7}: {achieved:.2f} GFLOP/s, {achieved / rate:.2%} of the matmul rate"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the study whose data is used")
    parser.add_argument("--targets", help="comma-separated; default: all of params' targets")
    parser.add_argument("--strategies", help="comma-separated; default: params' (with scratch)")
    parser.add_argument("--fractions", help="comma-separated; default: params'")
    parser.add_argument("--seeds", help="comma-separated; default: params'")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated of {', '.join(SIDES)}"
    )
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each side")
    parser.add_argument("--source", help="the source fine-tuned from; default: params' first")
    args = parser.parse_args()
    sides = args.sides.split(",")
    if not sides or not set(sides) <= set(SIDES):
        sys.exit(f"error: --sides {args.sides!r}: a comma-separated list of {', '.join(SIDES)}")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store-creation chatter
    overrides = [
        f"finetune.{key}=[{value}]"
        for key, value in (
            ("strategies", args.strategies),
            ("fractions", args.fractions),
            ("seeds", args.seeds),
        )
        if value
    ]
    params = load_params(args.params, overrides)  # validated: e.g. scratch must be there
    # one source: the peers' grid is one source's (every side fine-tunes from it)
    source = args.source or next(iter(params.sources))
    if source not in params.sources:
        sys.exit(f"error: unknown source {source!r}; {args.params} has {list(params.sources)}")
    params = params.model_copy(update={"sources": {source: params.sources[source]}})
    targets = args.targets.split(",") if args.targets else list(params.targets)
    unknown = [t for t in targets if t not in params.targets]
    if unknown:
        sys.exit(f"error: unknown target(s) {unknown}; {args.params} has {list(params.targets)}")
    cfg = params.finetune
    if {"fair", "naive"} & set(sides) and (cfg.layer_decay != 1 or cfg.augment):
        sys.exit("error: the peers implement neither finetune.layer_decay nor finetune.augment")
    require_inputs(args.params, targets, [source])
    data = Layout()
    cells = len(targets) * len(cfg.strategies) * len(cfg.fractions) * len(cfg.seeds)
    print(machine(params.runtime.threads))
    print(
        f"grid: targets {targets}, strategies {cfg.strategies}, fractions {cfg.fractions}, "
        f"seeds {cfg.seeds}: {cells} cells; lrs {cfg.lrs}, probe_l2 {cfg.probe_l2}, "
        f"max_epochs {cfg.max_epochs}, patience {cfg.patience}, batch {cfg.batch_size}, "
        f"backbone_lr_scale {cfg.backbone_lr_scale}, freeze_blocks {cfg.freeze_blocks}"
    )

    runs = sides_to_time(sides, params, targets, data)
    times: dict[str, list[float]] = {label: [] for label in runs}
    tables: dict[str, pd.DataFrame] = {}
    for _ in range(args.reps):  # the sides alternate: a slow spell of the machine hits all
        for label, run in runs.items():
            elapsed, tables[label] = run()
            times[label].append(elapsed)
            print(f"  {label}: {elapsed:.1f} s", flush=True)
    seconds = {label: statistics.median(t) for label, t in times.items()}
    for label, t in times.items():
        each = ", ".join(f"{s:.1f}" for s in t)
        print(f"{label:>7}: median {seconds[label]:.1f} s of {len(t)} run(s) [{each}]")
    settings = {side: [label for label in runs if label.startswith(f"{side}@")] for side in SIDES}
    for side, labels in settings.items():  # each side at its best setting stands for it
        if labels:
            best = min(labels, key=seconds.__getitem__)
            seconds[side], tables[side] = seconds[best], tables[best]
    if settings["ours"]:
        print("\n".join(ratio_lines(seconds, settings["fair"], settings["ours"])))
    if "naive" in tables:
        print(f"naive: {tables['naive'].steps.sum():,.0f} training steps, each logged to MLflow")
    for peer in ("fair", "naive"):
        if "ours" in tables and peer in tables:
            print(
                "mean test accuracy over targets, fractions and seeds (± std over seeds), "
                f"ours vs {NAMES[peer]}:"
            )
            print("\n".join(accuracy_lines(tables["ours"], tables[peer], NAMES[peer])))
    print("\n".join(limit_lines(params, targets, data, tables, {k: seconds[k] for k in runs})))


if __name__ == "__main__":
    main()
