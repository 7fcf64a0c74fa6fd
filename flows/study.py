"""The pipeline as a Prefect flow: the same stage functions as `dvc repro`, inside the same
execution frame (tasks/frame.py), with a fan-out of the fine-tuning groups on Prefect's task
runner. Started by `python -m flows.pipeline` (which checks everything it can first) or by a
served deployment (flows/serve.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Before Prefect is imported: route the stages' progress logs through Prefect (console and UI),
# and keep the local server from phoning home (machines without network print an error).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
# ...and let the stage functions log quietly when called outside a flow (tests, notebooks).
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server waits 20 s for itself by default; its first start on a new
# PREFECT_HOME took 13 s on an idle 2-core machine and missed 20 s every time with 4 busy
# processes beside it. A user's own setting wins.
STARTUP_TIMEOUT_S = "180"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S)

from prefect import Task, flow, task  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.context import get_run_context  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from flows.runners import share_api_with_local_workers  # noqa: E402
from tasks import frame  # noqa: E402
from tasks.analysis.report import read_verdicts, verdict_table  # noqa: E402
from tasks.compare import compare  # noqa: E402
from tasks.config.params import DEFAULT_PARAMS, load_params  # noqa: E402
from tasks.extract import extract  # noqa: E402
from tasks.finetune import Fanout, TargetGrid, train_group  # noqa: E402
from tasks.prepare import prepare  # noqa: E402
from tasks.pretrain import pretrain  # noqa: E402
from tasks.recording.versioning import Versioning  # noqa: E402
from tasks.workspace.layout import Layout  # noqa: E402

log = logging.getLogger("flows.study")
# Set by flows.pipeline's command line: this process's signals are the frame's (a deployment's
# flow runs in a process Prefect started, whose signals are Prefect's).
FROM_COMMAND_LINE = False


def _transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry what may pass (a lost file system, network or node), never a user error or a bug:
    the same input fails the same way."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) and not frame.is_user_error(
        err
    )


class _UserErrorsInOneLine(logging.Filter):
    """A user error inside a task reaches the user as the command's one `error:` line; Prefect
    would log its traceback twice first (task run, then flow run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and frame.is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


for _engine in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_engine).addFilter(_UserErrorsInOneLine())

# Prefect's own result cache stays off: DVC is the one judge of what is stale
# (tasks/recording/versioning.py), and a second cache could disagree with it.
_stage = task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_transient)
prepare_task = _stage(prepare, name="prepare")
pretrain_task = _stage(pretrain, name="pretrain")
extract_task = _stage(extract, name="extract", task_run_name="extract-{target}")
train_group_task = _stage(
    train_group, name="finetune", task_run_name="{data.name}/{group.strategy}/f{group.fraction}"
)
compare_task = _stage(compare, name="compare")


@flow(name="transfer-study")
def transfer_study(params_path: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """prepare -> pretrain -> (extract -> finetune groups in parallel) per target -> compare;
    each stage only if DVC finds it stale, and recorded in DVC after it runs."""
    frame.configure_logging()  # again here: a deployment's runs do not pass through main()
    if FROM_COMMAND_LINE:
        # Prefect installs its own SIGTERM handler for the flow run (it would wait for running
        # tasks, minutes); the frame's stops at once. Prefect restores its own afterwards.
        frame.install_stop_handlers()
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
    with frame.execution(params, "prefect", flow_run_id, layout, dvc) as run:
        run.run("prepare", prepare_)
        run.run("pretrain", pretrain_)
        # The fan-out: each target's features are extracted here, then its fine-tuning groups go
        # to the task runner (threads, or Dask workers) while the next target is extracted. The
        # flow keeps every file write, record and DVC call; workers get arrays only.
        if params.flow.task_runner == "dask" and not params.flow.dask_address:
            share_api_with_local_workers()
        fanout = Fanout(
            lambda data, group: train_group_.submit(data, params, group),
            as_completed,
            on_finished=lambda target: dvc.record(f"finetune@{target}"),
        )
        for target in params.targets:
            try:
                run.run(f"extract@{target}", extract_, target)
                if dvc.is_stale(f"finetune@{target}"):  # asked once its features are on disk
                    fanout.add(TargetGrid(params, target, layout), run.recorder)
            except Exception as err:  # the other targets go on; their work is kept
                fanout.fail(target, err)
        failures = fanout.collect()
        if failures:
            raise failures[0]
        run.run("compare", compare_)
        verdicts = verdict_table(read_verdicts(layout.reports / "verdicts.csv"))
        ran, skipped = ",".join(dvc.ran) or "none", ",".join(dvc.skipped) or "none"
        run.recorder.log(tags={"stages.run": ran, "stages.skipped": skipped})
        if dvc.push_if_remote():
            run.recorder.log(tags={"dvc.pushed": "true"})
        create_table_artifact(
            key="transfer-vs-scratch",
            table=verdicts.to_dict(orient="records"),
            description="Does transfer help? Per target and label budget, paired 95% intervals. "
            "Full report: reports/report.md",
        )
    dvc.close()
    log.info("stages run: %s; up to date: %s", ran, skipped)
    return verdicts.to_markdown(index=False, disable_numparse=True)
