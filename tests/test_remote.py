"""A run ends with `dvc push` when the repo has a default remote; a fresh clone pulls the very
same checkpoint and results."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import make_workspace, run_command

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def test_flow_pushes_to_the_remote_and_a_fresh_clone_pulls_identical_outputs(
    tmp_path: Path,
) -> None:
    workspace = make_workspace(tmp_path / "ws")
    remote = tmp_path / "remote"
    assert (
        run_command(
            ["python", "-m", "dvc", "remote", "add", "-d", "storage", str(remote)], cwd=workspace
        ).returncode
        == 0
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flow = run_command(
        ["python", "-m", "flows.pipeline"], cwd=workspace, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert flow.returncode == 0, flow.stderr[-2000:]
    parent = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()],
        filter_string="tags.orchestrator = 'prefect' and tags.`dvc.pushed` = 'true'",
    )
    assert len(parent) == 1
    subprocess.run([*GIT, "add", "-A"], cwd=workspace, check=True)
    subprocess.run([*GIT, "commit", "-qm", "a versioned run"], cwd=workspace, check=True)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace), str(clone)], check=True)
    pulled = run_command(["python", "-m", "dvc", "pull"], cwd=clone)
    assert pulled.returncode == 0, pulled.stderr
    for path in (
        "data/checkpoints/digits/backbone.pt",
        "data/results/new_classes.csv",
        "data/results/shifted.csv",
        "reports/comparison.csv",
    ):
        assert (clone / path).read_bytes() == (workspace / path).read_bytes(), path
    status = run_command(["python", "-m", "dvc", "status"], cwd=clone)
    assert "Data and pipelines are up to date." in status.stdout
