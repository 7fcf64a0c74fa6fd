"""The whole pipeline as a user runs it, through Prefect and through `dvc repro`, tiny params."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tasks.compare import read_results
from tasks.config.params import load_params
from tests.helpers import (
    digest,
    make_workspace,
    registered_backbone,
    results_digest,
    run_command,
)

pytestmark = pytest.mark.slow
PARENT = "mlflow.parentRunId"
OUTPUTS = [
    "data/checkpoints/digits/backbone.pt",
    "data/checkpoints/views/backbone.pt",
    "data/scores/shifted.csv",
    "data/results/shifted.curves.json",  # steps and curves reproduce; seconds are apart
    "reports/sources.csv",
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
    parents = [r for r in all_runs if PARENT not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["orchestrator"] == orchestrator
    children = {
        r.info.run_name: r for r in all_runs if r.data.tags.get(PARENT) == parent.info.run_id
    }
    targets = list(params.targets)
    assert set(children) == {
        "prepare",
        *(f"pretrain {s}" for s in params.sources),
        "compare",
        *(f"extract {t} {s}" for t in targets for s in params.sources),
        *(f"finetune {t}" for t in targets),
    }
    assert parent.data.tags["level"] == "execution"
    assert {r.data.tags["level"] for r in children.values()} == {"stage"}
    cfg = params.finetune
    budgets = len(cfg.fractions) + len(cfg.shots)
    comparison = pd.read_csv(workspace / "reports/comparison.csv", keep_default_na=False)
    for target in targets:
        results = read_results(workspace / "data/results" / f"{target}.csv")
        stage_id = children[f"finetune {target}"].info.run_id
        # a run per source x strategy x budget (scratch: one per budget), carrying the
        # comparison's numbers, seeds beneath it
        below = {r.info.run_name: r for r in all_runs if r.data.tags.get(PARENT) == stage_id}
        arms = 1 + (len(cfg.strategies) - 1) * len(params.sources)
        assert len(below) == arms * budgets
        for row in comparison[comparison.target == target].itertuples():
            path = [target, *filter(None, [row.source]), row.strategy, row.budget]
            run = below["/".join(path)]
            assert run.data.tags["level"] == "budget"
            assert run.data.metrics["test/acc_mean"] == pytest.approx(row.test_acc_mean, rel=1e-6)
            assert run.data.metrics["gain_pts"] == pytest.approx(row.gain_pts, abs=1e-4)
            assert run.data.tags["verdict"] == row.verdict
            seeds = [r for r in all_runs if r.data.tags.get(PARENT) == run.info.run_id]
            assert sorted(int(r.data.params["seed"]) for r in seeds) == cfg.seeds
            for seed_run in seeds:
                transfer = seed_run.data.tags["strategy"] != "scratch"
                assert seed_run.data.tags["kind"] == ("transfer" if transfer else "scratch")
                assert seed_run.data.tags["level"] == "seed"
                assert {"target", "strategy", "budget", "seed", "init", "trains"} <= (
                    seed_run.data.params.keys()
                )
                # a strategy has no param it does not use: the probe has no learning rate
                tuned = {k for k in seed_run.data.params if k.startswith("tuned.")}
                assert ("tuned.lr" in tuned) == (row.strategy != "linear_probe")
                assert ("tuned.l2" in tuned) == (row.strategy in ("linear_probe", "lp_ft"))
                # the gain against scratch on the same seed and subset, in points (scratch: 0)
                seed = int(seed_run.data.params["seed"])
                mine, scratch = (
                    results.set_index(["source", "strategy", "budget", "seed"]).test_acc[
                        (source, s, row.budget, seed)
                    ]
                    for source, s in ((row.source, row.strategy), ("", "scratch"))
                )
                assert seed_run.data.metrics["test/acc"] == pytest.approx(mine, rel=1e-6)
                gain = seed_run.data.metrics["gain_pts"]
                assert gain == pytest.approx(100 * (mine - scratch), abs=1e-4)
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "comparison.csv", "summary.csv", "verdicts.csv", "plots"} <= artifacts


def own_copy(runs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    """A private copy of a finished workspace, for a test that runs commands in it: the
    originals are shared (by the other test files, on another xdist worker) and stay as run."""
    workspace = tmp_path / name
    shutil.copytree(runs[name], workspace, symlinks=True)
    return workspace


def test_second_dvc_repro_runs_nothing(runs, tmp_path) -> None:
    workspace = own_copy(runs, "dvc", tmp_path)
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
def test_unknown_key_is_refused_and_outputs_are_untouched(runs, command, tmp_path) -> None:
    workspace = own_copy(runs, "dvc", tmp_path)
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
    checkpoints = {
        source: hashlib.md5(
            (workspace / f"data/checkpoints/{source}/backbone.pt").read_bytes()
        ).hexdigest()
        for source in ("digits", "views")
    }
    for run in all_runs:
        assert run.data.tags["git.commit"] == head and run.data.tags["git.dirty"] == "false"
        assert run.data.tags["orchestrator"] == orchestrator
        assert ("prefect.flow_run_id" in run.data.tags) == (orchestrator == "prefect")
    cells = [r for r in all_runs if "kind" in r.data.tags]
    for cell in cells:
        digests = {d.dataset.name: d.dataset.digest for d in cell.inputs.dataset_inputs}
        for source, checkpoint_md5 in checkpoints.items():  # a target's grid reads them all
            assert (
                cell.data.tags[f"dvc.md5.data/checkpoints/{source}/backbone.pt"] == checkpoint_md5
            )
            assert digests[f"data/checkpoints/{source}/backbone.pt"] == checkpoint_md5
            assert f"data/features/{cell.data.tags['target']}/{source}/train.npz" in digests


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
        for o in lock["stages"]["pretrain@digits"]["outs"]
        if o["path"] == "data/checkpoints/digits/backbone.pt"
    )
    result = run_command(
        ["python", "-m", "flows.trace", cell.info.run_id],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 0, result.stderr
    assert f"data/checkpoints/digits/backbone.pt  {locked}  = dvc.lock" in result.stdout
    head = run_command(["git", "rev-parse", "HEAD"], cwd=workspace).stdout.strip()
    assert f"git checkout {head}" in result.stdout
    assert f"dvc repro finetune@{cell.data.tags['target']}" in result.stdout


@pytest.mark.parametrize("orchestrator", ["prefect", "dvc"])
def test_backbone_is_registered_with_alias_and_lineage(runs, orchestrator) -> None:
    workspace = runs[orchestrator]
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    latest, model, files = registered_backbone(client, f"{params.registered_model}-digits")
    pretrain = client.get_run(latest.run_id)
    assert pretrain.info.run_name == "pretrain digits" and model.source_run_id == latest.run_id
    assert "MLmodel" in files
    source_md5 = hashlib.md5(
        (workspace / "data/prepared/digits/train.npz").read_bytes()
    ).hexdigest()
    assert latest.tags["dvc.md5.data/prepared/digits/train.npz"] == source_md5
    assert float(latest.tags["val_acc"]) == pytest.approx(
        pretrain.data.metrics["best/val_acc"], abs=1e-6
    )
    # the description says what it learnt from, how well, and on which files
    assert f"val acc {float(latest.tags['val_acc']):.4f}" in latest.description
    assert source_md5 in latest.description


def test_an_unchanged_backbone_keeps_its_registered_version(runs, tmp_path) -> None:
    """Pretraining again on the same data and params writes the same checkpoint: it is logged
    as the new run's model, but registered under the version that has its content already."""
    workspace = tmp_path / "ws"
    shutil.copytree(runs["prefect"], workspace, symlinks=True)
    store = f"sqlite:///{workspace / 'mlflow.db'}"
    again = run_command(
        ["python", "-m", "tasks.pretrain", "--source", "digits"],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": store},
    )
    assert again.returncode == 0, again.stderr
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(store)
    versions = client.search_model_versions(f"name = '{params.registered_model}-digits'")
    assert [str(v.version) for v in versions] == ["1"]
    experiment = client.get_experiment_by_name(params.experiment).experiment_id
    models = client.search_logged_models([experiment])
    digits = [m for m in models if m.tags.get("source") == "digits"]
    assert len(models) == 3 and len(digits) == 2  # one per pretraining run, in the Models tab
    assert len({m.tags["content_md5"] for m in digits}) == 1


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
        "up to date: pretrain@digits, pretrain@views, extract@new_classes, finetune@new_classes"
    ) in result.stderr
    after = digest(workspace)
    unchanged = [p for p in before if "new_classes" in p or p.startswith("data/checkpoints")]
    assert unchanged and all(after[p] == before[p] for p in unchanged)
    assert after["data/results/shifted.csv"] != before["data/results/shifted.csv"]
    status = run_command(["python", "-m", "dvc", "status"], cwd=workspace)
    assert "Data and pipelines are up to date." in status.stdout


def test_dask_local_cluster_gives_the_thread_runners_results(runs, tmp_path: Path) -> None:
    """The tiny study on a LocalCluster of 2 worker processes: every file equals the default
    runner's, every grid cell is recorded once, and DVC still versions the run (flow.* flags
    change where work runs, not what it computes)."""
    workspace = make_workspace(tmp_path / "dask")
    result = run_command(
        ["python", "-m", "flows.pipeline", "--task-runner", "dask", "--workers", "2"],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Creating a new Dask" in log and log.count("Register worker") == 2  # 2 processes
    assert log.count("Starting temporary server") == 1  # workers report to the flow's API
    assert results_digest(workspace) == results_digest(runs["prefect"])

    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.experiment)
    cells = Counter(
        r.info.run_name
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if r.data.tags.get("level") == "seed"
    )
    cfg = params.finetune
    budgets = len(cfg.fractions) + len(cfg.shots)
    arms = 1 + (len(cfg.strategies) - 1) * len(params.sources)  # scratch once per target
    grid = len(params.targets) * arms * budgets * len(cfg.seeds)
    assert len(cells) == grid and set(cells.values()) == {1}

    status = run_command(["python", "-m", "dvc", "status"], cwd=workspace)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
