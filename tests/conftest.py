"""Shared fixtures: the real tiny params, and run state (MLflow, Prefect) kept in tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from tasks.config.params import Params, load_params
from tests.helpers import TINY, make_workspace, run_command

# The test files that take a minute or more, first. pytest-xdist hands each worker whole files in
# collection order: these start first and the short files fill in around them, so the two
# workers finish together (alphabetically, the browser tests would start last, alone). The
# files on the shared `runs` (pipeline, interrupts, bad input) are spread so that no worker
# waits for the other to finish running them.
LONG_FILES = [
    "test_pipeline",
    "test_text_pipeline",
    "test_image_pipeline",
    "test_speech_pipeline",
    "test_ui",
    "test_frame",
    "test_tracking_server",
    "test_schedule",
    "test_interrupts",
    "test_bad_input",
    "test_remote",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    # a stable sort: each file's tests keep their order
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONG_FILES)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Each phase's report on the test item (`rep_call`...), for fixtures that act on failure
    (tests/test_ui.py takes a screenshot)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return load_params(TINY)


@pytest.fixture(autouse=True)
def _isolated_run_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes to the developer's MLflow store or Prefect home."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))


@pytest.fixture
def workspace(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the finished `dvc repro` workspace, to damage at will."""
    copy = tmp_path / "ws"
    shutil.copytree(runs["dvc"], copy, symlinks=True)
    return copy


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Path]:
    """One workspace run by the Prefect flow, one by `dvc repro`; each has its MLflow store.
    Tests only read them (or copy them first). Under pytest-xdist the first worker to need
    them runs them, and the other waits and reads the same (the runs take a minute)."""
    if worker_id == "master":  # no xdist
        return _run_both_ways(tmp_path_factory.mktemp("pipeline"))
    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of this session
    with FileLock(shared / "runs.lock"):
        record = shared / "runs.json"
        if not record.exists():
            done = _run_both_ways(shared / "pipeline")
            record.write_text(json.dumps({name: str(path) for name, path in done.items()}))
        return {name: Path(path) for name, path in json.loads(record.read_text()).items()}


def _run_both_ways(root: Path) -> dict[str, Path]:
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
