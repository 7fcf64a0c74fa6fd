"""The execution frame as a user meets it: a first run on a busy machine, and records that appear
while the work runs, timed as the work was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import TINY, make_workspace, run_command

pytestmark = pytest.mark.slow


def test_first_run_on_a_busy_machine_completes(tmp_path: Path) -> None:
    """A fresh PREFECT_HOME (Prefect's temporary server builds its database on its first start)
    with 4 busy processes on 2 cores: Prefect's default 20 s start-up wait failed here five
    times out of five; the flow gives it more time. The study is cut to one target and two
    strategies: the start-up is what is tested, and the suite's time is short."""
    small = yaml.safe_load(TINY.read_text())
    small["targets"] = {"new_classes": small["targets"]["new_classes"]}
    small["finetune"] |= {
        "strategies": ["scratch", "linear_probe"],
        "fractions": [1.0],
        "shots": [],
    }
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    workspace = make_workspace(tmp_path / "ws", tmp_path / "small.yaml")
    home = tmp_path / "fresh-prefect-home"
    assert not home.exists()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        result = run_command(
            ["python", "-m", "flows.pipeline"],
            cwd=workspace,
            env={
                "PREFECT_HOME": str(home),
                "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
            },
            timeout=900,
        )
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (workspace / "reports" / "verdicts.csv").exists()


def cell_runs(client: MlflowClient, target: str) -> list:
    """The finished grid-cell runs of `target` recorded so far."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"tags.target = '{target}' and attributes.status = 'FINISHED'"
    )
    return [r for r in runs if r.data.tags.get("kind") in ("scratch", "transfer")]


def test_cells_are_recorded_while_the_stage_runs_with_their_training_time(
    runs, tmp_path: Path
) -> None:
    """Read the MLflow store while `python -m tasks.finetune` (what `dvc repro` runs) is still
    training: finished cells are there already, each run spanning its group's training, with
    each learning rate's curve and the chosen one tagged."""
    workspace = make_workspace(tmp_path / "ws")
    for folder in ("data/prepared", "data/features", "data/checkpoints"):
        subprocess.run(
            ["cp", "-r", str(runs["dvc"] / folder), str(workspace / "data")], check=True
        )
    store = f"sqlite:///{workspace / 'mlflow.db'}"
    longer = ["finetune.max_epochs=40", "finetune.patience=40", "finetune.lrs=[0.003,0.001]"]
    command = [sys.executable, "-m", "tasks.finetune", "--target", "new_classes"]
    command += [arg for setting in longer for arg in ("--set", setting)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    process = subprocess.Popen(
        command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    client = MlflowClient(store)
    seen_while_running = []
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if (workspace / "mlflow.db").exists():
            found = cell_runs(client, "new_classes")
            if found and process.poll() is None:
                seen_while_running = found
                break
        time.sleep(0.5)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert seen_while_running, "no cell was recorded before the stage ended"

    results = pd.read_csv(workspace / "data/results/new_classes.csv")
    cells = cell_runs(client, "new_classes")
    assert len(cells) == len(results)  # every cell once
    experiment = cells[0].info.experiment_id
    stage = client.search_runs([experiment], "tags.stage = 'finetune'")[0]
    for cell in cells:
        start, end = cell.info.start_time, cell.info.end_time
        assert stage.info.start_time <= start < end <= stage.info.end_time
        if cell.data.tags["strategy"] == "linear_probe":
            continue  # no epochs
        epochs = client.get_metric_history(cell.info.run_id, "val/acc")
        assert epochs and all(start <= m.timestamp <= end for m in epochs)
        for lr in ("0.001", "0.003"):
            tried = client.get_metric_history(cell.info.run_id, f"lr_{lr}/val/acc")
            assert tried and all(start <= m.timestamp <= end for m in tried)
        assert float(cell.data.tags["chosen_lr"]) == float(cell.data.params["tuned.lr"])
        chosen = client.get_metric_history(
            cell.info.run_id, f"lr_{cell.data.tags['chosen_lr']}/val/acc"
        )
        assert [m.value for m in chosen] == [m.value for m in epochs]
