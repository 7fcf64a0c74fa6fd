"""The pipeline as a Prefect flow: the same stage functions as `dvc repro`, with a fan-out across
targets and one MLflow parent run per execution.

    python -m flows.pipeline [--params params.yaml] [--set finetune.seeds=[0,1,2]]
                             [--task-runner dask [--workers 2 | --dask-address tcp://host:8786]]
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

# Before Prefect is imported: route the stages' progress logs through Prefect (console and UI),
# and keep the local server from phoning home (machines without network print an error).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
# ...and let the stage functions log quietly when called outside a flow (tests, notebooks).
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import psutil
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, as_completed
from prefect.tasks import exponential_backoff

from flows.runners import share_api_with_local_workers, task_runner
from tasks.analysis.report import read_verdicts, verdict_table
from tasks.cli import (
    USER_ERRORS,
    Terminated,
    configure_logging,
    fail,
    interrupted,
    params_parser,
    raise_if_tracking_failed,
)
from tasks.compare import compare
from tasks.config.params import DEFAULT_PARAMS, load_params
from tasks.extract import extract
from tasks.finetune import TargetGrid, train_group
from tasks.prepare import prepare
from tasks.pretrain import pretrain
from tasks.recording.tracking import (
    Run,
    check_tracking,
    end_all_open_runs,
    start_pipeline_run,
    tracking_uri,
)
from tasks.recording.versioning import Versioning
from tasks.workspace.layout import Layout
from tasks.workspace.lock import workspace_lock

log = logging.getLogger("flows.pipeline")  # also when Prefect loads this file by path
_FROM_COMMAND_LINE = False  # main() started this process: its signal handling applies
_STOPPING, _LEAVING = threading.Event(), threading.Lock()

# Prefect's own result cache stays off: DVC is the one judge of what is stale
# (tasks/recording/versioning.py), and a second cache could disagree with it.
_stage = task(cache_policy=NO_CACHE, persist_result=False)
prepare_task = _stage(prepare, name="prepare")
pretrain_task = _stage(pretrain, name="pretrain")
extract_task = _stage(extract, name="extract", task_run_name="extract-{target}")
train_group_task = _stage(
    train_group, name="finetune", task_run_name="{data.name}/{group.strategy}/f{group.fraction}"
)
compare_task = _stage(compare, name="compare")


@flow(name="transfer-study")
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """prepare -> pretrain -> (extract -> finetune groups in parallel) per target -> compare;
    each stage only if DVC finds it stale, and recorded in DVC after it runs."""
    configure_logging()  # again here: a deployment's runs do not pass through main()
    if _FROM_COMMAND_LINE:
        # Prefect installs its own SIGTERM handler for the flow run (it would wait for running
        # tasks, minutes); ours stops at once. Prefect restores its saved handler afterwards.
        signal.signal(signal.SIGTERM, stop_now)
    params = load_params(params_path, overrides or [])
    layout = Layout()  # the working directory, as for `dvc repro`
    # flow.* overrides change where the work runs, never its results: DVC still judges such a run
    versioned = all(o.startswith("flow.") for o in overrides or [])
    dvc = Versioning(layout.root, enabled=Path(params_path) == DEFAULT_PARAMS and versioned)
    backoff = exponential_backoff(params.flow.retry_delay_seconds)  # 1x, 2x, 4x ... the delay
    retry = {"retries": params.flow.retries, "retry_delay_seconds": backoff}
    prepare_, pretrain_, extract_, train_group_, compare_ = (
        t.with_options(**retry)
        for t in (prepare_task, pretrain_task, extract_task, train_group_task, compare_task)
    )
    flow_run_id = str(get_run_context().flow_run.id)
    with (
        workspace_lock(layout.root),
        start_pipeline_run(params.experiment, "prefect", flow_run_id, layout.root) as parent,
    ):
        for name, stage in (("prepare", prepare_), ("pretrain", pretrain_)):
            if dvc.is_stale(name):
                stage(params, layout, parent)
                dvc.record(name)
        # The fan-out: each target's features are extracted here, then its fine-tuning groups go
        # to the task runner (threads, or Dask workers) while the next target is extracted. The
        # flow keeps every file write, MLflow record and DVC call; workers get arrays only.
        # A failed target does not stop the others: each that finishes is recorded (as
        # `dvc repro` would have), then the first failure is raised.
        if params.flow.task_runner == "dask" and not params.flow.dask_address:
            share_api_with_local_workers()
        grids, failures = {}, []
        for target in params.targets:
            try:
                if dvc.is_stale(f"extract@{target}"):
                    extract_(params, target, layout, parent)
                    dvc.record(f"extract@{target}")
                if dvc.is_stale(f"finetune@{target}"):  # asked once its features are on disk
                    grid = TargetGrid(params, target, layout)
                    groups = [train_group_.submit(grid.data, params, g) for g in grid.groups]
                    grids[target] = (grid, grid.stage_run(parent), groups)
            except Exception as err:
                failures.append(err)
        failures += _collect(grids, dvc)
        if failures:
            raise failures[0]
        if dvc.is_stale("compare"):
            compare_(params, layout, parent)
            dvc.record("compare")
        verdicts = verdict_table(read_verdicts(layout.reports / "verdicts.csv"))
        parent.log(tags={"stages.run": ",".join(dvc.ran) or "none",
                         "stages.skipped": ",".join(dvc.skipped) or "none"})  # fmt: skip
        if dvc.push_if_remote():
            parent.log(tags={"dvc.pushed": "true"})
        create_table_artifact(
            key="transfer-vs-scratch",
            table=verdicts.to_dict(orient="records"),
            description="Does transfer help? Per target and label budget, paired 95% intervals. "
            "Full report: reports/report.md",
        )
    raise_if_tracking_failed(parent)
    log.info("stages run: %s; up to date: %s", ", ".join(dvc.ran) or "none",
             ", ".join(dvc.skipped) or "none")  # fmt: skip
    return verdicts.to_markdown(index=False, disable_numparse=True)


Fanout = dict[str, tuple[TargetGrid, Run, list[PrefectFuture]]]  # target -> grid, stage, groups


def _collect(fanout: Fanout, dvc: Versioning) -> list[Exception]:
    """Keep each group's cells as soon as it finishes, whatever its target (in the progress file:
    a rerun redoes only the others), and finish a target once its last group is back: its MLflow
    records, results file and DVC entry. Returns each failed target's first error."""
    owner = {future: target for target, (_, _, groups) in fanout.items() for future in groups}
    left = {target: len(groups) for target, (_, _, groups) in fanout.items()}
    errors: dict[str, Exception] = {}

    def finish(target: str) -> None:
        grid, stage, _ = fanout[target]
        try:
            with stage:  # FAILED if a group failed
                if target in errors:
                    raise errors[target]
                grid.finish(stage)
            dvc.record(f"finetune@{target}")
        except Exception as err:
            errors.setdefault(target, err)

    for target in [t for t, n in left.items() if n == 0]:  # every group done before a restart
        finish(target)
    for future in as_completed(list(owner)):
        target = owner[future]
        try:
            fanout[target][0].add(future.result())
        except Exception as err:
            errors.setdefault(target, err)
        left[target] -= 1
        if left[target] == 0:
            finish(target)
    return list(errors.values())


def stop_now(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM: stop within seconds. Raise in the main thread, so that an MLflow call
    it is in unwinds and releases its database lock; if the flow then waits for running tasks
    (Prefect lets them finish: minutes), a watchdog ends the process after a short grace."""
    if _STOPPING.is_set():
        return
    _STOPPING.set()
    code = 128 + signum
    threading.Thread(target=_leave_after, args=(code, 2.0), daemon=True).start()
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _leave_after(code: int, grace: float) -> None:
    time.sleep(grace)
    leave(code)


def leave(code: int) -> NoReturn:
    """End the open MLflow runs as KILLED, stop Prefect's local server, say what was kept, and
    exit at once (finished outputs are complete files: writes are atomic; a rerun resumes)."""
    with _LEAVING:
        end_all_open_runs("KILLED")
        for child in psutil.Process().children(recursive=True):
            child.terminate()
        try:
            interrupted(Terminated() if code == 128 + signal.SIGTERM else KeyboardInterrupt())
        except SystemExit:
            sys.stderr.flush()
            os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = params_parser("Run the whole transfer study as a Prefect flow.")
    parser.add_argument(
        "--task-runner",
        choices=["threads", "dask"],
        help="where fine-tuning groups run (default: flow.task_runner)",
    )
    parser.add_argument("--workers", type=int, help="parallel groups (default: flow.workers)")
    parser.add_argument(
        "--dask-address",
        help="a Dask scheduler, e.g. tcp://host:8786 "
        "(default: flow.dask_address; none: a LocalCluster of --workers)",
    )
    args = parser.parse_args(argv)
    for key in ("task_runner", "workers", "dask_address"):  # the flags are flow.* overrides
        if getattr(args, key) is not None:
            args.overrides.append(f"flow.{key}={getattr(args, key)}")
    global _FROM_COMMAND_LINE
    _FROM_COMMAND_LINE = True
    configure_logging()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_now)
    try:
        # Refuse bad params, an unreachable tracking store or a busy workspace before Prefect
        # starts and before any work.
        params = load_params(args.params, args.overrides)
        runner = task_runner(params.flow)
        check_tracking(tracking_uri())
        with workspace_lock():
            flow = pipeline.with_options(task_runner=runner)
            markdown = flow(str(args.params), args.overrides)
    except USER_ERRORS as err:
        fail(err)
    except (KeyboardInterrupt, TerminationSignal) as err:  # the latter: Prefect's SIGTERM
        leave(130 if type(err) is KeyboardInterrupt else 128 + signal.SIGTERM)
    print(f"\n{markdown}\n")
    print("Report:  reports/report.md (verdicts, learning curves, method); tables and plots in")
    print("         reports/{comparison,summary,verdicts}.csv, reports/plots/*.png")
    print(
        f"MLflow:  mlflow ui --backend-store-uri {tracking_uri()}   (then http://127.0.0.1:5000)"
    )
    print("DVC:     dvc metrics show   |   dvc repro reproduces the same numbers")


if __name__ == "__main__":
    # Run the importable module's copy, not this `__main__` one: a Dask worker receives the
    # flow's context by pickle, which names `flows.pipeline` functions by reference, but would
    # copy `__main__` ones by value, with the locks their globals hold (unpicklable).
    from flows.pipeline import main as importable_main

    importable_main()
