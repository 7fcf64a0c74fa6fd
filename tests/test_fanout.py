"""The fine-tuning fan-out on a real Dask cluster gives what the default thread runner gives."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import task_runner
from tasks.config.params import FlowParams, ParamsError, load_params
from tests.helpers import make_workspace, results_digest, run_command


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


@pytest.mark.slow
def test_dask_local_cluster_gives_the_thread_runners_results(runs, tmp_path: Path) -> None:
    """The tiny study on a LocalCluster of 2 worker processes: every file equals the default
    runner's, every grid cell is recorded once, and DVC still versions the run (flow.* flags
    change where work runs, not what it computes)."""
    workspace = make_workspace(tmp_path / "dask")
    result = run_command(
        ["python", "-m", "flows.pipeline", "--task-runner", "dask", "--workers", "2"],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Creating a new Dask" in log and log.count("Register worker") == 2  # 2 processes
    assert log.count("Starting temporary server") == 1  # workers report to the flow's API
    assert results_digest(workspace) == results_digest(runs["prefect"])

    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.experiment)
    cells = Counter(
        r.info.run_name
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if "strategy" in r.data.tags
    )
    cfg = params.finetune
    budgets = len(cfg.fractions) + len(cfg.shots)
    grid = len(params.targets) * len(cfg.strategies) * budgets * len(cfg.seeds)
    assert len(cells) == grid and set(cells.values()) == {1}

    status = run_command(["python", "-m", "dvc", "status"], cwd=workspace)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
