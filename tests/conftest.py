"""Shared fixtures: the real tiny params, and run state (MLflow, Prefect) kept in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config.params import Params, load_params
from tests.helpers import TINY, make_workspace, run_command


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return load_params(TINY)


@pytest.fixture(autouse=True)
def _isolated_run_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes to the developer's MLflow store or Prefect home."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One workspace run by the Prefect flow, one by `dvc repro`; each has its MLflow store."""
    root = tmp_path_factory.mktemp("pipeline")
    done = {}
    for name, command in [
        ("prefect", ["-m", "flows.pipeline", "--params", "params.yaml"]),
        ("dvc", ["-m", "dvc", "repro"]),
    ]:
        workspace = make_workspace(root / name)
        result = run_command(
            ["python", *command],
            cwd=workspace,
            env={
                "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
                "PREFECT_HOME": str(root / "prefect-home"),
            },
        )
        assert result.returncode == 0, result.stdout + result.stderr
        (workspace / "run.log").write_text(result.stdout + result.stderr)
        done[name] = workspace
    return done
