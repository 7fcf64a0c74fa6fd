"""The pipeline as a Prefect flow: the same stage functions as `dvc repro`, inside the same
execution frame (tasks/frame.py), with a fan-out of the fine-tuning groups on Prefect's task
runner. Started by `python -m flows.pipeline` (which checks everything it can first) or by a
served deployment (flows/serve.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import Task, flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import get_run_context
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import State
from prefect.tasks import exponential_backoff

from flows.runners import share_api_with_local_workers
from tasks import frame
from tasks.analysis.report import read_verdicts, verdict_table
from tasks.compare import compare, record_headlines, recorded_headlines
from tasks.config.params import DEFAULT_PARAMS, Params, load_params
from tasks.extract import extract
from tasks.finetune import Fanout, TargetGrid, train_group
from tasks.prepare import prepare
from tasks.pretrain import pretrain
from tasks.recording.recorder import Recorder
from tasks.recording.versioning import Versioning
from tasks.synthesize import synthesize
from tasks.synthesizer import synthesizer
from tasks.workspace.layout import Layout

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
# Task-run names are fixed (Prefect would add a random suffix): `prepare`, `extract/<target>`...
synthesizer_task = _stage(synthesizer, name="synthesizer", task_run_name="synthesizer/{corpus}")
synthesize_task = _stage(synthesize, name="synthesize", task_run_name="synthesize/{corpus}")
prepare_task = _stage(prepare, name="prepare", task_run_name="prepare")
pretrain_task = _stage(pretrain, name="pretrain", task_run_name="pretrain/{source}")
extract_task = _stage(extract, name="extract", task_run_name="extract/{target}")
train_group_task = _stage(train_group, name="finetune", task_run_name="{data.name}/{group.source}")
compare_task = _stage(compare, name="compare", task_run_name="compare")


def _compare_the_others(
    compare_: Task, params: Params, layout: Layout, recorder: Recorder, failed: dict
) -> None:
    """One target's failure does not cost the others their comparison: compare those that
    finished, with the failed listed in the report, then fail the flow. DVC does not record this
    partial comparison, so the next run that finishes every target compares them all."""
    errors = {}
    for target, err in failed.items():
        first_line = (str(err).splitlines() or [""])[0]
        errors[target] = first_line
        if not frame.is_user_error(err):  # a bug: its traceback, before the one-line summary
            log.error("%s failed", target, exc_info=err)
            errors[target] = f"{type(err).__name__}: {first_line}".rstrip(": ")
    if len(failed) < len(params.targets):
        compare_(params, layout, recorder, failed=errors)
        where = "reports/report.md compares the others and lists the failed"
    else:
        where = "nothing to compare"
    listed = "; ".join(f"{target}: {error}" for target, error in errors.items())
    count = f"{len(failed)} of {len(params.targets)} targets failed"
    raise frame.TargetsFailed(f"{count} ({where}): {listed}")


def _flow_run_name() -> str:
    """What the run studied, as the Prefect UI lists it: the params file and any overrides."""
    parameters = flow_run.parameters
    return frame.run_label(
        parameters.get("params_path", DEFAULT_PARAMS), parameters.get("overrides") or []
    )


@flow(name="transfer-study", flow_run_name=_flow_run_name)
def transfer_study(params_path: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """synthesize per corpus -> prepare -> pretrain per source -> (extract -> finetune groups
    in parallel) per target -> compare; each stage only if DVC finds it stale, and recorded in
    DVC after it runs."""
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
    synthesizer_, synthesize_, prepare_, pretrain_, extract_, train_group_, compare_ = (
        t.with_options(**retry)
        for t in (
            *(synthesizer_task, synthesize_task, prepare_task, pretrain_task),
            *(extract_task, train_group_task, compare_task),
        )
    )
    flow_run_id = str(get_run_context().flow_run.id)
    with frame.execution(params, "prefect", flow_run_id, layout, dvc) as run:
        for corpus in params.synthesis:  # spoken-word corpora, rendered offline
            run.run(f"synthesizer@{corpus}", synthesizer_, corpus)
            run.run(f"synthesize@{corpus}", synthesize_, corpus)
        run.run("prepare", prepare_)
        # one source after another: MLflow's export of a registered model is not safe in two
        # threads at once (measured: "ProxyTorchDispatchMode slot already occupied")
        for source in params.sources:
            run.run(f"pretrain@{source}", pretrain_, source)
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
        failed = fanout.collect()
        if failed:
            _compare_the_others(compare_, params, layout, run.recorder, failed)
        run.run("compare", compare_)
        if "compare" in dvc.skipped:  # the parent still carries the answer, as it stands
            record_headlines(run.recorder, recorded_headlines(layout.reports))
        verdicts = verdict_table(read_verdicts(layout.reports / "verdicts.csv"))
        ran, skipped = dvc.ran or ["none"], dvc.skipped or ["none"]
        run.recorder.log(tags={"stages.run": ",".join(ran), "stages.skipped": ",".join(skipped)})
        if dvc.push_if_remote():
            run.recorder.log(tags={"dvc.pushed": "true"})
        create_table_artifact(
            key="transfer-vs-scratch",
            table=verdicts.to_dict(orient="records"),
            description="Does transfer help? Per target and label budget, paired 95% intervals. "
            "Full report: reports/report.md",
        )
    dvc.close()
    log.info("stages run: %s; up to date: %s", ", ".join(ran), ", ".join(skipped))
    return verdicts.to_markdown(index=False, disable_numparse=True)
