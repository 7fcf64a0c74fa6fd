"""The fine-tuning fan-out's task runners (a real Dask cluster against the thread runner, end to
end: tests/test_pipeline.py, which shares its reference run)."""

from __future__ import annotations

import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import task_runner
from tasks.config.params import FlowParams, ParamsError


def test_threads_runner_runs_as_many_groups_as_workers() -> None:
    runner = task_runner(FlowParams(task_runner="threads", workers=3))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def test_dask_runner_starts_a_local_cluster_or_joins_a_scheduler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local = task_runner(FlowParams(task_runner="dask", workers=3))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["processes"]
    remote = FlowParams(task_runner="dask", dask_address="tcp://10.0.0.5:8786")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ParamsError, match=r"flow\.dask_address: workers on other machines report"):
        task_runner(remote)  # remote workers could not reach a temporary server
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.1:4200/api")
    assert task_runner(remote).address == "tcp://10.0.0.5:8786"
