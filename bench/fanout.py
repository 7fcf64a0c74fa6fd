"""Wall time of the fine-tuning grid on a Dask LocalCluster of 1 worker process against 2.

    python bench/fanout.py [--params params.yaml] [--targets new_classes] [--reps 1]

What runs is what the Prefect flow runs for the fine-tuning stage, through the flow's own
driver (`tasks.finetune.Fanout`): every group of the grid (one strategy x fraction, all seeds)
submitted as the flow's own task (`flows.study.train_group_task`) to the flow's Dask runner
(flows/runners.py: a LocalCluster of single-threaded worker processes reporting to the flow's
Prefect API), with each target's arrays and checkpoint sent along, and each group kept as it
comes back. The time counts the cluster's start (a few seconds), submission, transfers,
training, the results' return and the tables written. It reads the prepared data, features and
checkpoint in data/ (run the pipeline first) from a copy in a temporary folder, where its
results go. The tables of both runs must be identical, and the script checks that they are.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# before Prefect is imported: no telemetry from a machine without network
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pandas as pd
from _common import machine, require_inputs, summary
from prefect import flow
from prefect.futures import as_completed

from flows.runners import share_api_with_local_workers, task_runner
from flows.study import train_group_task
from tasks.config.params import FlowParams, Params, load_params
from tasks.finetune import Fanout, TargetGrid
from tasks.recording.recorder import Recorder
from tasks.workspace.layout import Layout


@flow(name="fanout-bench")
def grid(params: Params, targets: list[str], root: str) -> tuple[float, dict[str, pd.DataFrame]]:
    """The flow's fan-out alone: (wall s, results tables). The clock starts before the first
    submit, which also starts the cluster, as in a real run."""
    share_api_with_local_workers()  # as the pipeline does: workers report to this flow's API
    grids = [TargetGrid(params, target, Layout(Path(root))) for target in targets]
    started = time.perf_counter()
    fanout = Fanout(lambda data, g: train_group_task.submit(data, params, g), as_completed)
    for target_grid in grids:
        fanout.add(target_grid, Recorder())
    errors = fanout.collect()
    assert not errors, errors
    return time.perf_counter() - started, fanout.tables


def run_grid(
    params: Params, targets: list[str], workers: int
) -> tuple[float, dict[str, pd.DataFrame]]:
    """(grid wall s, tables) on a fresh LocalCluster of `workers`, the flow's own runner, in a
    copy of the workspace's inputs."""
    runner = task_runner(FlowParams(task_runner="dask", workers=workers))
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as root:
        for folder in ("data/prepared", "data/features", "data/checkpoints"):
            shutil.copytree(folder, Path(root) / folder)
        return grid.with_options(task_runner=runner)(params, targets, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--targets", nargs="+", default=["new_classes"])
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    params = load_params(args.params)
    require_inputs(args.params, args.targets, list(params.sources))
    cfg = params.finetune
    n_groups = len(args.targets) * len(cfg.strategies) * len(cfg.fractions)
    print(machine(params.runtime.threads))
    print(
        f"grid: targets {args.targets}, {len(cfg.strategies)} strategies x "
        f"{len(cfg.fractions)} fractions = {n_groups} groups, each {len(cfg.seeds)} seeds x "
        f"{len(cfg.lrs)} lrs; max_epochs {cfg.max_epochs}, patience {cfg.patience}"
    )
    times: dict[int, list[float]] = {1: [], 2: []}
    tables: dict[int, dict[str, pd.DataFrame]] = {}
    for _ in range(args.reps):
        for workers in (1, 2):
            wall, tables[workers] = run_grid(params, args.targets, workers)
            times[workers].append(wall)
            print(f"  {workers} worker(s): grid {wall:.1f} s (cluster start-up included)")
    for target in args.targets:
        same = tables[1][target].equals(tables[2][target])
        assert same, f"{target}: 1 and 2 workers gave different results"
    print(summary("1 worker ", times[1]))
    print(summary("2 workers", times[2]))
    ratio = statistics.median(times[1]) / statistics.median(times[2])
    print(f"speed-up with 2 workers: {ratio:.2f}x (goal: >= 1.6x); cells identical: yes")


if __name__ == "__main__":
    main()
