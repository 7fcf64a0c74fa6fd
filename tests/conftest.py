"""Shared fixtures: the real tiny params, and run state (MLflow, Prefect) kept in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.params import Params, load_params
from tests.helpers import TINY


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return load_params(TINY)


@pytest.fixture(autouse=True)
def _isolated_run_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes to the developer's MLflow store or Prefect home."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
