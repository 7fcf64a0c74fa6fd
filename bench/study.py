"""The default study's fine-tuning grid, ours (`tasks.finetune.finetune`, the `finetune` stage)
against the naive way, side by side: both wall times, their ratio, and both test accuracies.

    python bench/study.py [--targets new_classes] [--strategies scratch,finetune]
                          [--fractions 0.01,1.0] [--seeds 0,1,2] [--reps 1]

It reads the default study's prepared data, features and checkpoint under data/ (run
`dvc repro` or `python -m flows.pipeline` first) and writes nothing there: both sides work in a
temporary folder, each with its own temporary sqlite MLflow store.

Ours: the stage function, called per target with a real MLflow parent run (as `tasks.frame`
creates one), exactly as the pipeline runs it (its results and progress files go to the
temporary folder).

The naive way, written here as a user following the classic PyTorch tutorial would: per run a
`TensorDataset` + `DataLoader(shuffle=True, batch_size)` (seeded), the runs one after another,
`mlflow.log_metric` (fluent API) on every step and for each epoch's validation scores, one
MLflow run per grid cell nested under a parent. The protocol is the same as ours: the same grid
(params.yaml's `finetune` section, narrowed by the options), the same label subsets
(`tasks.data.subsets.label_subset`) and seeds, the same model inits (`tasks.models.classifier`),
Adam with the same learning-rate grid chosen on validation (accuracy, ties to the lower loss),
the same max epochs, patience and best-weights early stopping on validation accuracy, the same
strategies (scratch; finetune, lp_ft and partial with `backbone_lr_scale`, partial with
`freeze_blocks` frozen). Validation and test are scored in batches of 1,024 through a
DataLoader. The linear probe (and LP-FT's head) uses the same L-BFGS solver
(`tasks.learning.probe.fit_probe`) on both sides: the naive side only adds its MLflow run, so
the probe does not flatter our ratio. Data order differs between the sides (DataLoader vs our
seeded permutation), so accuracies agree in distribution, not bit for bit: they are compared
against the spread over seeds.

Timed: the grid only, from loading the target's files to the last MLflow record; creating each
store and parent run is not timed. With `--reps` above 1 both sides are repeated alternately
and the median of each is reported.
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
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from _common import machine, require_inputs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.config.params import FinetuneParams, Params, load_params
from tasks.data.datasets import SPLITS, Labelled, load_meta, load_split
from tasks.data.subsets import label_subset, resolve_budgets
from tasks.finetune import finetune
from tasks.learning.probe import ProbeResult, fit_probe
from tasks.learning.runtime import configure
from tasks.models.classifier import (
    Classifier,
    build_classifier,
    load_checkpoint,
    pretrained_classifier,
)
from tasks.recording.tracking import start_pipeline_run
from tasks.workspace.layout import Layout

EVAL_BATCH = 1024


@dataclass(frozen=True)
class Naive:
    """One target's files, loaded once (arrays in memory; each run makes its own DataLoader)."""

    inputs: dict[str, Labelled]
    features: dict[str, Labelled]
    num_classes: int
    checkpoint: dict
    checkpoint_path: Path
    device: torch.device  # where the networks train; batches move there, as in the tutorial


def loader(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None) -> DataLoader:
    """The tutorial's DataLoader; shuffled (from a seeded generator) when `seed` is given."""
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    if seed is None:
        return DataLoader(dataset, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


@torch.no_grad()
def score(model: nn.Module, batches: DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a DataLoader."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return loss / count, correct / count


def probe(data: Naive, subset: np.ndarray, cfg: FinetuneParams) -> ProbeResult:
    """The stage's L-BFGS probe on the frozen features of `subset`, its l2 chosen on val."""

    def split(
        name: str, index: np.ndarray | slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = data.features[name]
        return torch.from_numpy(features.x[index]), torch.from_numpy(features.y[index])

    return fit_probe(
        split("train", subset), split("val"), split("test"), data.num_classes, cfg.probe_l2
    )


def start_model(
    strategy: str, data: Naive, subset: np.ndarray, cfg: FinetuneParams, seed: int
) -> Classifier:
    """The strategy's initial model, built as the stage builds it (same seeded init)."""
    if strategy == "scratch":
        return build_classifier(data.checkpoint["arch"], data.num_classes, seed)
    model = pretrained_classifier(data.checkpoint, data.num_classes, seed, data.checkpoint_path)
    if strategy == "lp_ft":
        head = probe(data, subset, cfg)
        with torch.no_grad():
            model.head.weight.copy_(head.weight)
            model.head.bias.copy_(head.bias)
    return model


def train_network(
    strategy: str, data: Naive, subset: np.ndarray, cfg: FinetuneParams, seed: int
) -> dict[str, float]:
    """The tutorial loop per learning rate, every step logged; the lr is chosen on val.
    `steps` counts the training steps (each one an MLflow call) over the whole lr grid."""
    x, y = data.inputs["train"].x[subset], data.inputs["train"].y[subset]
    val = loader(data.inputs["val"].x, data.inputs["val"].y, EVAL_BATCH)
    begin = start_model(strategy, data, subset, cfg, seed)
    scale = 1.0 if strategy == "scratch" else cfg.backbone_lr_scale
    frozen = cfg.freeze_blocks if strategy == "partial" else 0
    best: tuple[tuple[float, float], float, nn.Module, int] | None = None
    steps = 0
    for lr in cfg.lrs:
        model = copy.deepcopy(begin).to(data.device)
        model.backbone.blocks[:frozen].requires_grad_(False)
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
        train = loader(x, y, cfg.batch_size, seed)
        top, top_state, top_epoch, step = (-1.0, -float("inf")), None, -1, 0
        for epoch in range(cfg.max_epochs):
            if epoch - 1 - top_epoch >= cfg.patience:
                break  # the stage's rule: no better val accuracy for `patience` epochs
            model.train()
            for xb, yb in train:
                xb, yb = xb.to(data.device), yb.to(data.device)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                mlflow.log_metric(f"train_loss_lr{lr:g}", loss.item(), step=step)
                step += 1
            val_loss, val_acc = score(model, val, data.device)
            mlflow.log_metric(f"val_loss_lr{lr:g}", val_loss, step=epoch)
            mlflow.log_metric(f"val_acc_lr{lr:g}", val_acc, step=epoch)
            if (val_acc, -val_loss) > top:  # ties go to the lower val loss, as in the stage
                top, top_epoch = (val_acc, -val_loss), epoch
                top_state = copy.deepcopy(model.state_dict())
        model.load_state_dict(top_state)
        steps += step
        if best is None or top > best[0]:
            best = (top, lr, model, top_epoch)
    top, lr, model, top_epoch = best
    test = loader(data.inputs["test"].x, data.inputs["test"].y, EVAL_BATCH)
    _, test_acc = score(model, test, data.device)
    return {
        "lr": lr,
        "val_acc": top[0],
        "test_acc": test_acc,
        "best_epoch": top_epoch,
        "steps": steps,
    }


def naive_target(params: Params, target: str, layout: Layout) -> pd.DataFrame:
    """The whole grid of one target the naive way, from the study's one source (see main); one
    nested MLflow run per grid cell."""
    cfg = params.finetune
    source = next(iter(params.sources))
    data = Naive(
        inputs={s: load_split(layout.prepared(target), s) for s in SPLITS},
        features={s: load_split(layout.features(target, source), s) for s in SPLITS},
        num_classes=load_meta(layout.prepared(target))["num_classes"],
        checkpoint=load_checkpoint(layout.checkpoint(source)),
        checkpoint_path=layout.checkpoint(source),
        device=configure(params.runtime),  # threads and device, as the stage sets them
    )
    rows = []
    budgets, _ = resolve_budgets(data.inputs["train"].y, cfg.fractions, cfg.shots)
    for strategy in cfg.strategies:
        for budget in budgets:
            for seed in cfg.seeds:
                subset = label_subset(data.inputs["train"].y, budget.per_class, seed)
                name = f"{target}/{strategy}/{budget.name}/s{seed}"
                with mlflow.start_run(run_name=name, nested=True):
                    mlflow.log_params(
                        {
                            "target": target,
                            "strategy": strategy,
                            "budget": budget.name,
                            "seed": seed,
                            "n_labels": len(subset),
                        }
                    )
                    if strategy == "linear_probe":
                        result = probe(data, subset, cfg)
                        row = {
                            "l2": result.l2,
                            "val_acc": result.val_acc,
                            "test_acc": result.test_acc,
                        }
                    else:
                        row = train_network(strategy, data, subset, cfg, seed)
                    mlflow.log_metric("test_acc", row["test_acc"])
                rows.append(
                    {"target": target, "strategy": strategy, "budget": budget.name, "seed": seed}
                    | row
                )
    return pd.DataFrame(rows)


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


def run_naive(params: Params, targets: list[str], data: Layout) -> tuple[float, pd.DataFrame]:
    with tempfile.TemporaryDirectory(prefix="bench-study-naive-") as folder:
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        mlflow.set_experiment(params.experiment)
        with mlflow.start_run(run_name="naive study"):
            started = time.perf_counter()
            tables = [naive_target(params, target, data) for target in targets]
            elapsed = time.perf_counter() - started
    return elapsed, pd.concat(tables, ignore_index=True)


def accuracy_lines(ours: pd.DataFrame, naive: pd.DataFrame) -> list[str]:
    """Per strategy and overall: mean test accuracy on each side, and the seeds' spread (the
    standard deviation over seeds of the per-seed mean over targets and fractions)."""
    lines = []
    groups = [(s, ours.strategy == s, naive.strategy == s) for s in ours.strategy.unique()]
    groups.append(("all", ours.strategy.notna(), naive.strategy.notna()))
    for name, mine, theirs in groups:
        seeds = {
            side: table[rows].groupby("seed").test_acc.mean()
            for side, table, rows in (("ours", ours, mine), ("naive", naive, theirs))
        }
        gap = seeds["ours"].mean() - seeds["naive"].mean()
        line = (
            f"{name:>13}: ours {seeds['ours'].mean():.4f} ± {seeds['ours'].std():.4f}, naive "
            f"{seeds['naive'].mean():.4f} ± {seeds['naive'].std():.4f}  (difference {gap:+.4f}"
        )
        if len(seeds["ours"]) < 2:  # one seed has no spread to compare against
            lines.append(f"{line}; one seed: no spread to judge it by)")
            continue
        spread = max(s.std() for s in seeds.values())
        verdict = "within" if abs(gap) <= spread else "BEYOND"
        lines.append(f"{line}, {verdict} the seeds' spread {spread:.4f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the study whose data is used")
    parser.add_argument("--targets", help="comma-separated; default: all of params' targets")
    parser.add_argument("--strategies", help="comma-separated; default: params' (with scratch)")
    parser.add_argument("--fractions", help="comma-separated; default: params'")
    parser.add_argument("--seeds", help="comma-separated; default: params'")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each side")
    parser.add_argument("--source", help="the source fine-tuned from; default: params' first")
    args = parser.parse_args()
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
    # one source: the naive side's grid is one source's (both sides fine-tune from it)
    source = args.source or next(iter(params.sources))
    if source not in params.sources:
        sys.exit(f"error: unknown source {source!r}; {args.params} has {list(params.sources)}")
    params = params.model_copy(update={"sources": {source: params.sources[source]}})
    targets = args.targets.split(",") if args.targets else list(params.targets)
    unknown = [t for t in targets if t not in params.targets]
    if unknown:
        sys.exit(f"error: unknown target(s) {unknown}; {args.params} has {list(params.targets)}")
    require_inputs(args.params, targets, [source])
    data = Layout()
    cfg = params.finetune
    cells = len(targets) * len(cfg.strategies) * len(cfg.fractions) * len(cfg.seeds)
    print(machine(params.runtime.threads))
    print(
        f"grid: targets {targets}, strategies {cfg.strategies}, fractions {cfg.fractions}, "
        f"seeds {cfg.seeds}: {cells} cells; lrs {cfg.lrs}, probe_l2 {cfg.probe_l2}, "
        f"max_epochs {cfg.max_epochs}, patience {cfg.patience}, batch {cfg.batch_size}, "
        f"backbone_lr_scale {cfg.backbone_lr_scale}, freeze_blocks {cfg.freeze_blocks}"
    )
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    tables: dict[str, pd.DataFrame] = {}
    for _ in range(args.reps):
        for side, run in (("ours", run_ours), ("naive", run_naive)):
            elapsed, tables[side] = run(params, targets, data)
            times[side].append(elapsed)
            print(f"  {side}: {elapsed:.1f} s", flush=True)
    for side, t in times.items():
        each = ", ".join(f"{s:.1f}" for s in t)
        print(f"{side:>5}: median {statistics.median(t):.1f} s of {len(t)} run(s) [{each}]")
    print(f"naive: {tables['naive'].steps.sum():,.0f} training steps, each logged to MLflow")
    ratio = statistics.median(times["naive"]) / statistics.median(times["ours"])
    print(f"speed-up, naive / ours: {ratio:.2f}x  (goal: at least 5x)")
    print("mean test accuracy over targets, fractions and seeds (± std over seeds):")
    print("\n".join(accuracy_lines(tables["ours"], tables["naive"])))


if __name__ == "__main__":
    main()
