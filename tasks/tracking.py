"""MLflow records: one parent run per pipeline execution, stage and fine-tuning runs nested below.

Everything goes through `MlflowClient` with explicit run ids, never the fluent API's active-run
stack, which is per thread and would lose the parent inside Prefect's thread pool. Metrics are
written in batches (one `log_batch` call costs about as much as one `log_metric`).

Which parent a stage joins:
- the Prefect flow creates the parent and hands it to every task;
- under `dvc repro`, each stage is its own process: the stages of one repro find their shared
  parent by a tag holding the pid and start time of the `dvc` process that launched them;
- a stage run by hand gets a parent of its own.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXECUTION_TAG = "pipeline.execution"
PARENT_TAG = "mlflow.parentRunId"
_BATCH = 1000  # MLflow's limit of metrics per log_batch request (params: 100)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _now_ms() -> int:
    return int(time.time() * 1000)


class Run:
    """One MLflow run, addressed by id; a context manager that ends it with the right status."""

    def __init__(self, client: MlflowClient | None, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def child(self, name: str, tags: dict[str, str] | None = None) -> Run:
        """A new run nested under this one."""
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={PARENT_TAG: self.run_id, **(tags or {})}
        )
        return Run(self.client, run.info.run_id, self.experiment_id)

    def log(
        self,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """Params, metrics (at one step) and tags in one batched request."""
        stamp = _now_ms()
        self._batch(
            [Metric(k, float(v), stamp, step) for k, v in (metrics or {}).items()],
            [Param(k, str(v)) for k, v in (params or {}).items()],
            [RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_history(self, history: Iterable[dict[str, float]]) -> None:
        """Per-epoch metrics (`step` = epoch), written in as few requests as MLflow allows."""
        stamp = _now_ms()
        metrics = [
            Metric(k, float(v), stamp, epoch)
            for epoch, values in enumerate(history)
            for k, v in values.items()
        ]
        self._batch(metrics, [], [])

    def _batch(self, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        while metrics or params or tags:
            self.client.log_batch(self.run_id, metrics[:_BATCH], params[:100], tags[:100])
            metrics, params, tags = metrics[_BATCH:], params[100:], tags[100:]

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_status(self, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.set_status("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            self.set_status("KILLED")
        else:
            self.set_status("FAILED")


class NullRun(Run):
    """A run that records nothing: for callers that want the stage without tracking."""

    def __init__(self) -> None:
        super().__init__(client=None, run_id="", experiment_id="")

    def child(self, name: str, tags: dict[str, str] | None = None) -> Run:
        return self

    def _batch(self, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_status(self, status: str) -> None:
        pass


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def start_pipeline_run(experiment: str, orchestrator: str, execution: str | None = None) -> Run:
    """Create the parent run of one pipeline execution."""
    client = MlflowClient(tracking_uri())
    exp_id = experiment_id(client, experiment)
    tags = {
        "orchestrator": orchestrator,
        EXECUTION_TAG: execution or f"{orchestrator}-{_now_ms()}",
    }
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')} ({orchestrator})"
    run = client.create_run(exp_id, run_name=name, tags=tags)
    return Run(client, run.info.run_id, exp_id)


def _dvc_execution() -> str | None:
    """An id for the `dvc repro` / `dvc exp run` process that launched this stage, if any.

    DVC sets DVC_STAGE in each stage command's environment; the launching DVC process is the
    nearest ancestor without it (a shell may stand between the two).
    """
    if "DVC_STAGE" not in os.environ:
        return None
    for process in psutil.Process().parents():
        try:
            if "DVC_STAGE" not in process.environ():
                return f"dvc-{socket.gethostname()}-{process.pid}-{process.create_time():.0f}"
        except psutil.Error:
            continue
    return None


def join_stage_parent(experiment: str) -> Run:
    """The parent run a stage's command line joins (see the module docstring); marked RUNNING."""
    execution = _dvc_execution()
    if execution is None:
        return start_pipeline_run(experiment, orchestrator="cli")
    client = MlflowClient(tracking_uri())
    exp_id = experiment_id(client, experiment)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{execution}'", max_results=1
    )
    if not found:
        return start_pipeline_run(experiment, orchestrator="dvc", execution=execution)
    parent = Run(client, found[0].info.run_id, exp_id)
    parent.set_status(RunStatus.to_string(RunStatus.RUNNING))
    return parent
