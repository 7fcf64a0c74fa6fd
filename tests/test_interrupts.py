"""Stops and restarts, as a user meets them: Ctrl-C, SIGTERM and SIGKILL in the middle of a
stage or the flow stop it within seconds, end its records KILLED, and a rerun resumes to the
same result; a second execution on a busy workspace is refused. On a copy of a finished run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import digest, one_line_error, run_command

pytestmark = pytest.mark.slow
FLOW = ["python", "-m", "flows.pipeline"]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# The README promises a stop within 10 s: typically 0.1 s (the work unwinds, its records end
# KILLED), at worst 1.5 s for the work to unwind plus 2 s to end the records (tasks/frame.py).
STOP_BOUND_S = 8
LONG_PRETRAIN = [
    "--set",
    "pretrain.max_epochs=150",
    "--set",
    "pretrain.patience=150",
]
LONGER_PRETRAIN = [
    "--set",
    "pretrain.max_epochs=5000",
    "--set",
    "pretrain.patience=5000",
]


def interrupt_pretraining(workspace: Path, signum: int) -> subprocess.CompletedProcess:
    """Start pretraining, let it finish an epoch or so, then send `signum`."""
    process = start(
        [sys.executable, "-m", "tasks.pretrain", "--source", "digits", *LONG_PRETRAIN], workspace
    )
    wait_for(workspace / "data/checkpoints/digits/pretrain.resume.pt")
    time.sleep(0.3)
    sent = time.monotonic()
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < STOP_BOUND_S
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def latest_runs(count: int) -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["start_time DESC"], max_results=count)


@pytest.fixture(scope="module")
def uninterrupted(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The checkpoint of the long pretraining run from start to end without a stop (in a copy
    of the shared workspace; computed once for every way of stopping it)."""
    copy = tmp_path_factory.mktemp("uninterrupted") / "ws"
    shutil.copytree(runs["dvc"], copy, symlinks=True)
    command = [sys.executable, "-m", "tasks.pretrain", "--source", "digits", *LONG_PRETRAIN]
    assert run_command(command, cwd=copy).returncode == 0
    return (copy / "data/checkpoints/digits/backbone.pt").read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_stopped_pretraining_resumes_to_the_same_weights(
    workspace: Path, uninterrupted: bytes, signum: int
) -> None:
    """Ctrl-C, or kill -9 (no cleanup at all), then the same command again."""
    command = [sys.executable, "-m", "tasks.pretrain", "--source", "digits", *LONG_PRETRAIN]

    process = interrupt_pretraining(workspace, signum)
    state = workspace / "data/checkpoints/digits/pretrain.resume.pt"
    assert state.exists()  # the last complete epoch
    if signum == signal.SIGINT:
        assert process.returncode == 130
        assert (
            "interrupted: finished outputs and the last complete epoch are kept" in process.stderr
        )
        killed = latest_runs(2)
        parents = [r for r in killed if "mlflow.parentRunId" not in r.data.tags]
        assert [r.info.run_name for r in killed if r not in parents] == ["pretrain digits"]
        assert len(parents) == 1 and parents[0].info.run_name.endswith(" cli")
        assert {r.info.status for r in killed} == {"KILLED"}

    resumed = run_command(command, cwd=workspace)
    assert resumed.returncode == 0 and "resuming from the end of epoch" in resumed.stderr
    assert not state.exists()
    assert (workspace / "data/checkpoints/digits/backbone.pt").read_bytes() == uninterrupted


def test_sigterm_stops_pretraining_and_ends_its_runs_killed(workspace: Path) -> None:
    process = interrupt_pretraining(workspace, signal.SIGTERM)
    assert process.returncode == 143
    assert (workspace / "data/checkpoints/digits/pretrain.resume.pt").exists()
    assert {r.info.status for r in latest_runs(2)} == {"KILLED"}


def test_finetune_killed_hard_redoes_only_unfinished_cells(workspace: Path) -> None:
    expected = (workspace / "data/results/new_classes.csv").read_bytes()
    (workspace / "data/results/new_classes.csv").unlink()
    command = [sys.executable, "-m", "tasks.finetune", "--target", "new_classes"]
    process = start(command, workspace)
    progress = workspace / "data/results/new_classes.progress.json"
    wait_for(progress)
    process.kill()  # kill -9: no cleanup at all
    process.wait()
    resumed = run_command(command, cwd=workspace)
    assert resumed.returncode == 0 and "grid cells already finished" in resumed.stderr
    assert (workspace / "data/results/new_classes.csv").read_bytes() == expected


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_flow_interrupted_stops_within_seconds_and_ends_runs_killed(
    workspace: Path, signum: int, code: int
) -> None:
    process = start([sys.executable, "-m", "flows.pipeline", *LONG_PRETRAIN], workspace)
    wait_for(workspace / "data/checkpoints/digits/pretrain.resume.pt", timeout=120)
    sent = time.monotonic()
    process.send_signal(signum)
    process.communicate(timeout=30)
    assert process.returncode == code and time.monotonic() - sent < STOP_BOUND_S
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.orchestrator = 'prefect'",
        max_results=500,
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"]
    assert "RUNNING" not in {r.info.status for r in runs}
    assert "KILLED" in {r.info.status for r in runs if r.data.tags.get("stage") == "pretrain"}


def test_second_execution_on_a_busy_workspace_is_refused(workspace: Path) -> None:
    first = start([sys.executable, "-m", "flows.pipeline", *LONGER_PRETRAIN], workspace)
    wait_for(workspace / "data/checkpoints/digits/pretrain.resume.pt", timeout=120)
    before = digest(workspace)
    for command in (FLOW, ["python", "-m", "tasks.compare"]):
        second = run_command(command, cwd=workspace)
        assert second.returncode == 1
        line = one_line_error(second)
        assert "another pipeline execution is running here (pid" in line
        assert str(first.pid) in line
    assert first.poll() is None  # the first one goes on, undisturbed
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=30)
    after = digest(workspace)
    assert {k: v for k, v in after.items() if "checkpoints" not in k} == {
        k: v for k, v in before.items() if "checkpoints" not in k
    }
