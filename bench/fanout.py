"""Wall time of the fine-tuning grid on a Dask LocalCluster of 1 worker process against 2.

    python bench/fanout.py [--params params.yaml] [--targets new_classes] [--reps 1]

What runs is what the Prefect flow runs for the fine-tuning stage: every group of the grid
(`tasks.finetune.TargetGrid.groups`, one strategy x fraction, all seeds) submitted as the flow's
own task (`flows.pipeline.train_group_task`) to the flow's Dask runner (flows/runners.py: a
LocalCluster of single-threaded worker processes reporting to the flow's Prefect API), with
each target's arrays and checkpoint sent along. The time counts the cluster's start (a few
seconds), submission, transfers, training and the results' return. It reads the prepared
data, features and checkpoint in data/ (run the pipeline first). The cells of both runs must
be identical, and the script checks that they are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

# before Prefect is imported: no telemetry from a machine without network
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from _common import machine, summary
from prefect import flow

from flows.pipeline import train_group_task
from flows.runners import share_api_with_local_workers, task_runner
from tasks.config.params import FlowParams, Params, load_params
from tasks.finetune import Cell, TargetData, TargetGrid
from tasks.workspace.layout import Layout


@flow(name="fanout-bench")
def grid(params: Params, targets: list[TargetData], groups: dict[str, list]) -> tuple[float, list]:
    """The flow's fan-out alone: (wall s, cells). The clock starts before the first submit,
    which also starts the cluster, as in a real run."""
    share_api_with_local_workers()  # as the pipeline does: workers report to this flow's API
    started = time.perf_counter()
    futures = [train_group_task.submit(data, params, g) for data in targets
               for g in groups[data.name]]  # fmt: skip
    cells = [cell for future in futures for cell in future.result()]
    return time.perf_counter() - started, cells


def run_grid(params: Params, grids: list[TargetGrid], workers: int) -> tuple[float, list[Cell]]:
    """(grid wall s, cells) on a fresh LocalCluster of `workers`, the flow's own runner."""
    runner = task_runner(FlowParams(task_runner="dask", workers=workers))
    return grid.with_options(task_runner=runner)(
        params, [g.data for g in grids], {g.target: g.groups for g in grids}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--targets", nargs="+", default=["new_classes"])
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    params = load_params(args.params)
    grids = [TargetGrid(params, target, Layout()) for target in args.targets]
    cfg = params.finetune
    n_groups = sum(len(g.groups) for g in grids)
    print(machine(params.runtime.threads))
    print(f"grid: targets {args.targets}, {len(cfg.strategies)} strategies x "
          f"{len(cfg.fractions)} fractions = {n_groups} groups, each {len(cfg.seeds)} seeds x "
          f"{len(cfg.lrs)} lrs; max_epochs {cfg.max_epochs}, patience {cfg.patience}")  # fmt: skip
    times: dict[int, list[float]] = {1: [], 2: []}
    cells: dict[int, list] = {}
    for _ in range(args.reps):
        for workers in (1, 2):
            wall, cells[workers] = run_grid(params, grids, workers)
            times[workers].append(wall)
            print(f"  {workers} worker(s): grid {wall:.1f} s (cluster start-up included)")
    rows = {n: sorted((c.row["strategy"], c.row["fraction"], c.row["seed"], c.row["test_acc"])
                      for c in cells[n]) for n in (1, 2)}  # fmt: skip
    assert rows[1] == rows[2], "1 and 2 workers gave different cells"
    print(summary("1 worker ", times[1]))
    print(summary("2 workers", times[2]))
    ratio = statistics.median(times[1]) / statistics.median(times[2])
    print(f"speed-up with 2 workers: {ratio:.2f}x (goal: >= 1.6x); cells identical: yes")


if __name__ == "__main__":
    main()
