"""What the flow's command line tells a user at the end: how to reproduce or version the run."""

from __future__ import annotations

from pathlib import Path

from flows.pipeline import _versioning_hint


def test_a_plain_run_is_reproduced_by_dvc_repro() -> None:
    assert "dvc repro reproduces the same numbers" in _versioning_hint(Path("params.yaml"), [])
    # flow.* settings change where work runs, never its numbers
    hint = _versioning_hint(Path("params.yaml"), ["flow.workers=4"])
    assert "dvc repro reproduces the same numbers" in hint


def test_a_run_with_set_says_how_to_version_it() -> None:
    hint = _versioning_hint(Path("params.yaml"), ["finetune.seeds=[0, 1]", "flow.workers=4"])
    assert "dvc repro" not in hint
    assert hint.endswith("dvc exp run -S 'finetune.seeds=[0, 1]'")  # quoted for the shell


def test_a_run_with_another_params_file_says_dvc_versions_params_yaml_only() -> None:
    hint = _versioning_hint(Path("params.ucr.yaml"), [])
    assert "params.ucr.yaml" in hint and "dvc exp run" in hint and "reproduces" not in hint
