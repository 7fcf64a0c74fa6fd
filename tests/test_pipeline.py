"""The whole pipeline as a user runs it, through Prefect and through `dvc repro`, tiny params."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import yaml
from mlflow import MlflowClient

from tasks.config.params import load_params
from tests.helpers import digest, results_digest, run_command

pytestmark = pytest.mark.slow
OUTPUTS = [
    "data/checkpoints/backbone.pt",
    "data/results/new_classes.csv",
    "data/results/shifted.csv",
    "reports/comparison.csv",
]


def test_both_orchestrators_give_identical_files(runs) -> None:
    prefect, dvc = results_digest(runs["prefect"]), results_digest(runs["dvc"])
    assert set(OUTPUTS) <= prefect.keys()
    assert prefect == dvc


def test_flow_prints_the_table_and_no_traceback(runs) -> None:
    log = (runs["prefect"] / "run.log").read_text()
    assert "Traceback" not in log
    assert "| target" in log and "best transfer (on val)" in log and "verdict" in log
    assert "mlflow ui" in log and "dvc metrics show" in log


@pytest.mark.parametrize("orchestrator", ["prefect", "dvc"])
def test_mlflow_holds_one_parent_with_nested_stage_and_finetune_runs(runs, orchestrator) -> None:
    workspace = runs[orchestrator]
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.experiment)
    all_runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["orchestrator"] == orchestrator
    children = {
        r.info.run_name: r
        for r in all_runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    targets = list(params.targets)
    assert set(children) == {
        "prepare",
        "pretrain",
        "compare",
        *(f"extract {t}" for t in targets),
        *(f"finetune {t}" for t in targets),
    }
    cfg = params.finetune
    grid = len(cfg.strategies) * (len(cfg.fractions) + len(cfg.shots)) * len(cfg.seeds)
    for target in targets:
        stage_id = children[f"finetune {target}"].info.run_id
        runs_below = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == stage_id]
        assert len(runs_below) == grid
        for run in runs_below:
            transfer = run.data.tags["strategy"] != "scratch"
            assert run.data.tags["kind"] == ("transfer" if transfer else "scratch")
            assert run.data.tags["target"] == target
            assert {"target", "strategy", "budget", "seed", "n_labels"} <= run.data.params.keys()
            assert ("lr" in run.data.params) == (run.data.tags["strategy"] != "linear_probe")
            assert "test/acc" in run.data.metrics
            assert ("gain_vs_scratch" in run.data.metrics) == transfer
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "comparison.csv", "summary.csv", "verdicts.csv", "plots"} <= artifacts


def test_second_dvc_repro_runs_nothing(runs) -> None:
    workspace = runs["dvc"]
    before = digest(workspace)
    lock = (workspace / "dvc.lock").read_text()
    result = run_command(["python", "-m", "dvc", "repro"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "Data and pipelines are up to date." in result.stdout
    assert "Running stage" not in result.stdout
    assert digest(workspace) == before and (workspace / "dvc.lock").read_text() == lock


@pytest.mark.parametrize(
    "command", [["-m", "flows.pipeline"], ["-m", "tasks.finetune", "--target", "shifted"]]
)
def test_unknown_key_is_refused_and_outputs_are_untouched(runs, command) -> None:
    workspace = runs["dvc"]
    before = digest(workspace)
    params = workspace / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("finetune:\n", "finetune:\n  sedds: [0, 1]\n", 1))
    try:
        result = run_command(["python", *command], cwd=workspace)
    finally:
        params.write_text(original)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: finetune.sedds: unknown key"
    assert digest(workspace) == before


@pytest.mark.parametrize("orchestrator", ["prefect", "dvc"])
def test_every_run_carries_its_lineage(runs, orchestrator) -> None:
    workspace = runs[orchestrator]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    head = run_command(["git", "rev-parse", "HEAD"], cwd=workspace).stdout.strip()
    experiment = client.get_experiment_by_name(load_params(workspace / "params.yaml").experiment)
    all_runs = client.search_runs([experiment.experiment_id], max_results=1000)
    checkpoint_md5 = hashlib.md5(
        (workspace / "data/checkpoints/backbone.pt").read_bytes()
    ).hexdigest()
    for run in all_runs:
        assert run.data.tags["git.commit"] == head and run.data.tags["git.dirty"] == "false"
        assert run.data.tags["orchestrator"] == orchestrator
        assert ("prefect.flow_run_id" in run.data.tags) == (orchestrator == "prefect")
    cells = [r for r in all_runs if "kind" in r.data.tags]
    for cell in cells:
        assert cell.data.tags["dvc.md5.data/checkpoints/backbone.pt"] == checkpoint_md5
        digests = {d.dataset.name: d.dataset.digest for d in cell.inputs.dataset_inputs}
        assert digests["data/checkpoints/backbone.pt"] == checkpoint_md5
        assert f"data/features/{cell.data.tags['target']}/train.npz" in digests


def test_trace_names_the_checkpoint_that_dvc_lock_holds(runs) -> None:
    workspace = runs["dvc"]
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(load_params(workspace / "params.yaml").experiment)
    cell = client.search_runs(
        [experiment.experiment_id], filter_string="tags.kind = 'transfer'", max_results=1
    )[0]
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    locked = next(
        o["md5"]
        for o in lock["stages"]["pretrain"]["outs"]
        if o["path"] == "data/checkpoints/backbone.pt"
    )
    result = run_command(
        ["python", "-m", "flows.trace", cell.info.run_id],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr
    assert f"data/checkpoints/backbone.pt  {locked}  = dvc.lock" in result.stdout
    head = run_command(["git", "rev-parse", "HEAD"], cwd=workspace).stdout.strip()
    assert f"git checkout {head}" in result.stdout
    assert f"dvc repro finetune@{cell.data.tags['target']}" in result.stdout


@pytest.mark.parametrize("orchestrator", ["prefect", "dvc"])
def test_backbone_is_registered_with_alias_and_lineage(runs, orchestrator) -> None:
    workspace = runs[orchestrator]
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    latest = client.get_model_version_by_alias(params.registered_model, "current")
    pretrain = client.get_run(latest.run_id)
    assert pretrain.info.run_name == "pretrain"
    source_md5 = hashlib.md5(
        (workspace / "data/prepared/source/train.npz").read_bytes()
    ).hexdigest()
    assert latest.tags["dvc.md5.data/prepared/source/train.npz"] == source_md5
    assert float(latest.tags["val_acc"]) == pytest.approx(
        pretrain.data.metrics["best/val_acc"], abs=1e-6
    )
    artifacts = {a.path for a in client.list_artifacts(latest.run_id, "model")}
    assert "model/MLmodel" in artifacts


def test_dvc_decides_what_the_flow_reruns(runs, tmp_path) -> None:
    """After one target's params change, the flow reruns that target (and prepare and compare),
    skips the rest, and leaves DVC with nothing to do."""
    workspace = tmp_path / "ws"
    shutil.copytree(runs["prefect"], workspace, symlinks=True)
    params = workspace / "params.yaml"
    params.write_text(params.read_text().replace("seed: 3}", "seed: 7}", 1))  # shifted's data
    before = digest(workspace)
    result = run_command(["python", "-m", "flows.pipeline"], cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "stages run: prepare, extract@shifted, finetune@shifted, compare; "
        "up to date: pretrain, extract@new_classes, finetune@new_classes"
    ) in result.stderr
    after = digest(workspace)
    unchanged = [p for p in before if "new_classes" in p or p.startswith("data/checkpoints")]
    assert unchanged and all(after[p] == before[p] for p in unchanged)
    assert after["data/results/shifted.csv"] != before["data/results/shifted.csv"]
    status = run_command(["python", "-m", "dvc", "status"], cwd=workspace)
    assert "Data and pipelines are up to date." in status.stdout
