"""Scheduled runs for real: a Prefect server on loopback, the served deployment, two triggered runs
that queue instead of overlapping, and every run versioned by DVC."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.helpers import free_port, make_workspace, run_command, spawn

pytestmark = pytest.mark.slow
DEPLOYMENT = "transfer-study/transfer-study"


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            found = check()
            if found:
                return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(tmp_path: Path):
    """`prefect server start` on a free loopback port, with its own PREFECT_HOME."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    process = spawn(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        log=tmp_path / "server.log",
        env={
            "PREFECT_HOME": str(tmp_path / "server-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        },
    )
    try:
        wait_until(
            lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200,
            120,
            "the Prefect server",
        )
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_served_deployment_runs_queue_and_are_versioned(server: str, tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "ws")
    env = {
        "PREFECT_API_URL": server,
        "PREFECT_HOME": str(tmp_path / "client-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
    }
    served = spawn([sys.executable, "-m", "flows.serve"], workspace, env, tmp_path / "serve.log")
    try:
        with temporary_settings(updates={PREFECT_API_URL: server}):
            with get_client(sync_client=True) as client:
                wait_until(
                    lambda: client.read_deployment_by_name(DEPLOYMENT), 90, "the served deployment"
                )
            first = run_deployment(DEPLOYMENT, timeout=0)
            second = run_deployment(DEPLOYMENT, timeout=0)
            with get_client(sync_client=True) as client:

                def finished():
                    runs = [client.read_flow_run(r.id) for r in (first, second)]
                    return runs if all(r.state.is_final() for r in runs) else None

                first, second = wait_until(finished, 420, "both flow runs to finish")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    assert first.state.is_completed() and second.state.is_completed(), log[-3000:]
    earlier, later = sorted((first, second), key=lambda r: r.start_time)
    assert earlier.end_time <= later.start_time  # the second waited for the first
    assert "stages run: prepare, pretrain" in log  # the first run did the work...
    assert "stages run: none" in log  # ...and the second found everything up to date
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.orchestrator = 'prefect' and tags.`stages.run` != ''",
        order_by=["start_time ASC"],
    )
    assert [p.data.tags["prefect.flow_run_id"] for p in parents] == [
        str(earlier.id),
        str(later.id),
    ]
    assert parents[0].data.tags["stages.run"].startswith("prepare,pretrain")
    assert parents[1].data.tags["stages.run"] == "none"
    assert (workspace / "reports" / "comparison.csv").exists()
    status = run_command(["python", "-m", "dvc", "status"], cwd=workspace)
    assert "Data and pipelines are up to date." in status.stdout  # recorded as by `dvc repro`


def test_serve_refuses_to_start_without_a_server(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.serve"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "schedules need a Prefect server" in result.stderr.strip().splitlines()[-1]
