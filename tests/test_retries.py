"""A fine-tuning group that fails once is retried by Prefect, and the run completes with the same
numbers as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from tasks import finetune as finetune_stage
from tests.helpers import make_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API for flows run in this process, stopped while pytest still
    captures output (Prefect's own at-exit shutdown would log into closed streams)."""
    with prefect_test_harness():
        yield


def test_a_transient_failure_is_retried_and_the_run_completes(
    runs, prefect_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.study import transfer_study

    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(workspace)
    failures = []
    probe = finetune_stage._fit_probe

    def flaky_probe(*args, **kwargs):
        if not failures:  # the first call fails, as a lost disk or node would
            failures.append("failed once")
            raise OSError("transient failure injected by the test")
        return probe(*args, **kwargs)

    monkeypatch.setattr(finetune_stage, "_fit_probe", flaky_probe)
    markdown = transfer_study("params.yaml")
    assert failures == ["failed once"]
    assert "| target" in markdown
    for target in ("new_classes", "shifted"):
        ours = (workspace / "data" / "results" / f"{target}.csv").read_bytes()
        assert ours == (runs["prefect"] / "data" / "results" / f"{target}.csv").read_bytes()
