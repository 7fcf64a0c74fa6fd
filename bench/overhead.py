"""What orchestration and tracking cost: the whole pipeline through the Prefect flow with MLflow,
beside the same stage functions called in a plain Python loop with tracking off.

    python bench/overhead.py [--params params.yaml] [--reps 3] [--tiny-reps 3] [--breakdown]

Two sizes: tests/params.tiny.yaml (seconds of work: its extra time is almost all fixed cost)
and `--params` (default: the default study, ~5 minutes a side on 2 cores). Each run starts
from nothing in a fresh workspace (tests/helpers.make_workspace: the code, dvc.yaml, the params
file as params.yaml, a new git repo; made before the clock starts) and is timed from the
process start to its exit, so both sides pay for the interpreter and their imports:

- flow: `python -m flows.pipeline`, as a user runs it: Prefect's ephemeral API, one MLflow
  parent run with every stage and fine-tuning run nested (sqlite:///mlflow.db in the
  workspace, a new store each run), DVC asked before each stage and told after it (`dvc
  status`, `dvc commit`: the flow is versioned because it runs the workspace's params.yaml).
- plain: `python bench/overhead.py --plain` in the workspace: prepare, pretrain, extract,
  the fine-tuning grids and compare, called directly with `tasks.recording.recorder.Recorder()`
  (no MLflow client, no store, no hashing of inputs: tracking is off, not redirected). The grids
  fan out through the flow's own driver (`tasks.finetune.Fanout`) on `flow.workers` plain
  threads while the next target is extracted, so the difference prices the orchestration and
  tracking, not the parallelism.
- with `--breakdown`, also "flow, DVC off": the same flow given its params under another file
  name (`--params unversioned.yaml`), which it runs without asking or telling DVC; its extra
  over plain is Prefect and MLflow alone.

Prefect runs against its own PREFECT_HOME in a temporary folder, made and warmed by one
untimed tiny flow run first (the first start on a new home creates its database: ~13 s once),
so the numbers are those of every run after a user's first. The sides alternate within each
repetition, and medians are taken per size and side.

The fixed start-up cost is the intercept of extra time against work: with extra = flow - plain
at each size, the proportional extra is p = (extra_large - extra_tiny) / (plain_large -
plain_tiny), and the start-up is extra_tiny - p * plain_tiny. Goal: p at most 5% and a
start-up under 10 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.helpers: one definition of a workspace
from tests.helpers import TINY, make_workspace  # noqa: E402


def plain() -> None:
    """The stages in a plain loop in the current directory, untracked (what `--plain` runs)."""
    # imported here: only this side's process needs them, and its clock counts their import
    from tasks.compare import compare
    from tasks.config.params import load_params
    from tasks.extract import extract
    from tasks.finetune import Fanout, TargetGrid, train_group
    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout

    params, layout, off = load_params("params.yaml"), Layout(), Recorder()
    prepare(params, layout, off)
    for source in params.sources:
        pretrain(params, source, layout, off)
    # the flow's fan-out: each target extracted here, then its fine-tuning groups handed to
    # `flow.workers` threads while the next target is extracted
    with ThreadPoolExecutor(max_workers=params.flow.workers) as pool:
        fanout = Fanout(lambda data, group: pool.submit(train_group, data, params, group))
        for target in params.targets:
            extract(params, target, layout, off)
            fanout.add(TargetGrid(params, target, layout), off)
        errors = fanout.collect()
    assert not errors, errors
    compare(params, layout, off)


def timed_run(command: list[str], params_file: Path, env: dict[str, str]) -> float:
    """Wall seconds of `command` in a fresh workspace holding `params_file` as params.yaml."""
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as folder:
        workspace = make_workspace(Path(folder) / "ws", params_file)
        shutil.copy2(workspace / "params.yaml", workspace / "unversioned.yaml")
        started = time.perf_counter()
        done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="large size")
    parser.add_argument("--reps", type=int, default=3, help="repetitions at the large size")
    parser.add_argument("--tiny-reps", type=int, default=3, help="repetitions at the tiny size")
    parser.add_argument("--breakdown", action="store_true", help="also time the flow, DVC off")
    parser.add_argument("--plain", action="store_true", help="internal: run the plain side here")
    args = parser.parse_args()
    if args.plain:
        plain()
        return

    home = Path(tempfile.mkdtemp(prefix="bench-overhead-prefect-"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default
    env["PREFECT_HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # its dvc, git
    sides = {
        "flow": [sys.executable, "-m", "flows.pipeline"],
        "plain": [sys.executable, str(Path(__file__).resolve()), "--plain"],
    }
    if args.breakdown:
        sides["flow, DVC off"] = [*sides["flow"], "--params", "unversioned.yaml"]
    sizes = {"tiny": (TINY.resolve(), args.tiny_reps), "large": (args.params.resolve(), args.reps)}
    print(machine())
    print("sizes: " + ", ".join(f"{n} = {p} ({r} rep(s))" for n, (p, r) in sizes.items()))
    try:
        timed_run(sides["flow"], TINY, env)  # untimed: creates the Prefect home's database
        median: dict[tuple[str, str], float] = {}
        for size, (params_file, reps) in sizes.items():
            times: dict[str, list[float]] = {side: [] for side in sides}
            for rep in range(reps):
                for side in list(sides)[rep % len(sides) :] + list(sides)[: rep % len(sides)]:
                    times[side].append(timed_run(sides[side], params_file, env))
            for side, t in times.items():
                median[size, side] = statistics.median(t)
                each = ", ".join(f"{s:.1f}" for s in t)
                print(f"{size:>5} {side:>13}: median {median[size, side]:.1f} s [{each}]")
            for side in sides:
                if side != "plain":
                    extra = median[size, side] - median[size, "plain"]
                    print(
                        f"{size:>5} extra of {side}: {extra:+.1f} s "
                        f"({extra / median[size, 'plain']:+.1%})"
                    )
    finally:
        shutil.rmtree(home, ignore_errors=True)

    work = median["large", "plain"] - median["tiny", "plain"]
    if work <= 0 or sizes["large"][0] == sizes["tiny"][0]:
        print("the large size is no more work than the tiny one: no intercept to fit")
        return
    for side in sides:
        if side == "plain":
            continue
        extra = {size: median[size, side] - median[size, "plain"] for size in sizes}
        share = (extra["large"] - extra["tiny"]) / work
        startup = extra["tiny"] - share * median["tiny", "plain"]
        print(
            f"{side}: proportional extra {share:+.1%} (goal: at most 5%), fixed start-up "
            f"{startup:.1f} s (goal: under 10 s)"
        )


if __name__ == "__main__":
    main()
