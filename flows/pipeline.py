"""The pipeline as a Prefect flow: the same stage functions as `dvc repro`, with a fan-out across
targets and one MLflow parent run per execution.

    python -m flows.pipeline [--params params.yaml] [--set finetune.seeds=[0,1,2]]
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
from prefect.futures import PrefectFuture
from prefect.tasks import exponential_backoff

from flows.versioning import Versioning
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
from tasks.extract import extract
from tasks.finetune import finetune
from tasks.layout import Layout
from tasks.params import DEFAULT_PARAMS, load_params
from tasks.prepare import prepare
from tasks.pretrain import pretrain
from tasks.report import read_verdicts, verdict_table
from tasks.tracking import (
    check_tracking,
    end_all_open_runs,
    start_pipeline_run,
    tracking_uri,
)
from tasks.workspace import workspace_lock

log = logging.getLogger("flows.pipeline")  # also when Prefect loads this file by path
_FROM_COMMAND_LINE = False  # main() started this process: its signal handling applies
_STOPPING, _LEAVING = threading.Event(), threading.Lock()

# Prefect's own result cache stays off: DVC is the one judge of what is stale
# (flows/versioning.py), and a second cache could disagree with it.
_stage = task(cache_policy=NO_CACHE, persist_result=False)
prepare_task = _stage(prepare, name="prepare")
pretrain_task = _stage(pretrain, name="pretrain")
extract_task = _stage(extract, name="extract", task_run_name="extract-{target}")
finetune_task = _stage(finetune, name="finetune", task_run_name="finetune-{target}")
compare_task = _stage(compare, name="compare")


@flow(name="transfer-study")
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """prepare -> pretrain -> (extract -> finetune) per target, in parallel -> compare; each
    stage only if DVC finds it stale, and recorded in DVC after it runs."""
    configure_logging()  # again here: a deployment's runs do not pass through main()
    if _FROM_COMMAND_LINE:
        # Prefect installs its own SIGTERM handler for the flow run (it would wait for running
        # tasks, minutes); ours stops at once. Prefect restores its saved handler afterwards.
        signal.signal(signal.SIGTERM, stop_now)
    params = load_params(params_path, overrides or [])
    layout = Layout()  # the working directory, as for `dvc repro`
    dvc = Versioning(layout.root, enabled=Path(params_path) == DEFAULT_PARAMS and not overrides)
    backoff = exponential_backoff(params.flow.retry_delay_seconds)  # 1x, 2x, 4x ... the delay
    retry = {"retries": params.flow.retries, "retry_delay_seconds": backoff}
    prepare_, pretrain_, extract_, finetune_, compare_ = (
        t.with_options(**retry)
        for t in (prepare_task, pretrain_task, extract_task, finetune_task, compare_task)
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
        # the fan-out: targets in parallel threads; DVC is asked and told from this thread only
        extracting = {
            t: extract_.submit(params, t, layout, parent)
            for t in params.targets
            if dvc.is_stale(f"extract@{t}")
        }
        # A failed target does not stop the others: wait for every task, record each that
        # finished (as `dvc repro` would have), then raise the first failure.
        finetuning, failures = {}, []
        for target in params.targets:
            if target in extracting:
                if not _finished(extracting[target], failures):
                    continue
                dvc.record(f"extract@{target}")
            if dvc.is_stale(f"finetune@{target}"):  # asked once its features are on disk
                finetuning[target] = finetune_.submit(params, target, layout, parent)
        for target, future in finetuning.items():
            if _finished(future, failures):
                dvc.record(f"finetune@{target}")
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


def _finished(future: PrefectFuture, failures: list[Exception]) -> bool:
    """Wait for a task; True if it succeeded, else its exception is added to `failures`."""
    try:
        future.result()
    except Exception as err:
        failures.append(err)
        return False
    return True


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
    args = parser.parse_args(argv)
    global _FROM_COMMAND_LINE
    _FROM_COMMAND_LINE = True
    configure_logging()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_now)
    try:
        # Refuse bad params, an unreachable tracking store or a busy workspace before Prefect
        # starts and before any work.
        load_params(args.params, args.overrides)
        check_tracking(tracking_uri())
        with workspace_lock():
            markdown = pipeline(str(args.params), args.overrides)
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
    main()
