"""The team's tracking setup for real: PostgreSQL on loopback, `mlflow server` on it with proxied
artifacts, the tiny pipeline pointed at it by MLFLOW_TRACKING_URI, and every record read back
through the REST client: the parent, the stage runs, each fine-tuning grid cell exactly once
(the targets are fine-tuned side by side), their metrics and the artifacts. Then many writers at
once: executions creating the same new experiment, and threads sharing one execution's parent."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from mlflow import MlflowClient

from tasks.compare import read_results
from tasks.config.params import Params, load_params
from tasks.data.subsets import fraction_name, shots_name
from tasks.recording.tracking import PARENT_TAG, start_pipeline_run
from tests.helpers import (
    free_port,
    log_tail,
    make_workspace,
    poll,
    registered_backbone,
    run_command,
    stop,
)

pytestmark = pytest.mark.slow
ROLE, PASSWORD, DATABASE = "mlflow", "test-only", "mlflow"  # a throwaway cluster's login
STAGES = ("prepare", "pretrain digits", "pretrain views", "compare")


def postgres_bin() -> Path | None:
    """PostgreSQL's server programs: on PATH, or where Debian's package puts them (off PATH)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: float(p.parent.parent.name)
    )
    return found[-1].parent if found else None


def server_user() -> str | None:
    """Who runs PostgreSQL: it refuses to run as root, so root hands it to the `postgres` user
    that Debian's package creates; anyone else runs it as themselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder, on a free loopback port, with the role and
    database a team would create; yields its SQLAlchemy URI (password included)."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    user = server_user()
    # not under pytest's tmp folder: that is private to this user, and the server runs as `user`
    home = Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
    if user:
        shutil.chown(home, user)
    as_user: dict[str, Any] = {"user": user, "cwd": home}
    password_file, log = home / "password", home / "postgres.log"
    password_file.write_text(PASSWORD)
    if user:
        shutil.chown(password_file, user)
    port = free_port()
    process = None
    try:
        initdb = subprocess.run(
            [
                binaries / "initdb",
                "-D",
                home / "data",
                "-U",
                ROLE,
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            **as_user,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert initdb.returncode == 0, f"initdb failed: {initdb.stdout}{initdb.stderr}"
        # fsync off: the cluster is thrown away after the test, durability buys nothing here
        process = subprocess.Popen(
            [
                binaries / "postgres",
                "-D",
                home / "data",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                home,
                "-c",
                "fsync=off",
            ],
            **as_user,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        login = f"{ROLE}:{PASSWORD}@127.0.0.1:{port}"

        def accepts_logins() -> bool:
            with psycopg.connect(f"postgresql://{login}/postgres", connect_timeout=2):
                return True

        poll(accepts_logins, process, 60, "PostgreSQL", log)
        created = subprocess.run(
            [binaries / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", ROLE, DATABASE],
            env={**os.environ, "PGPASSWORD": PASSWORD},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stderr + log_tail(log)
        yield f"postgresql://{login}/{DATABASE}"
    finally:
        if process is not None:
            stop(process, signal.SIGINT)  # PostgreSQL's "fast" shutdown: ends open sessions
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`mlflow server` on PostgreSQL with proxied artifacts, as in the README; 2 workers,
    so that requests are served by more than one process, as on a team's server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port, log, artifacts = free_port(), root / "mlflow-server.log", root / "artifacts"
    uri = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            postgres,
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "2",
        ],
        cwd=root,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # no GenAI job runner: the pipeline uses none, and it costs 8 processes and slow stops
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        # the first start creates MLflow's tables in PostgreSQL: seconds to tens of seconds
        poll(
            lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200,
            process,
            240,
            "mlflow server",
            log,
        )
        # /health answers before a worker has opened the store: ask the store itself
        poll(lambda: MlflowClient(uri).search_experiments(), process, 120, "mlflow store", log)
        yield {"uri": uri, "artifacts": artifacts, "log": log}
    finally:
        stop(process, signal.SIGTERM)


@pytest.fixture(scope="module")
def pipeline(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny study run by the Prefect flow, recording on the server."""
    root = tmp_path_factory.mktemp("team")
    workspace = make_workspace(root / "ws")
    env = {"MLFLOW_TRACKING_URI": server["uri"], "PREFECT_HOME": str(root / "prefect-home")}
    result = run_command(
        ["python", "-m", "flows.pipeline", "--params", "params.yaml"],
        cwd=workspace,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-5000:] + log_tail(server["log"])
    )
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(server["uri"])
    [experiment] = [e for e in client.search_experiments() if e.name == params.experiment]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {
        "workspace": workspace,
        "params": params,
        "client": client,
        "runs": runs,
        "experiment": experiment,
        **server,
    }


def test_one_parent_with_every_stage_and_grid_cell_exactly_once(pipeline: dict[str, Any]) -> None:
    params: Params = pipeline["params"]
    runs, log = pipeline["runs"], log_tail(pipeline["log"])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1, f"{len(parents)} parent runs\n{log}"
    parent = parents[0]
    assert parent.data.tags["orchestrator"] == "prefect"
    assert {r.info.status for r in runs} == {"FINISHED"}, log
    stages = {
        r.info.run_name: r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id
    }
    targets = list(params.targets)
    sources = list(params.sources)
    assert set(stages) == {
        *STAGES,
        *(f"extract {t} {s}" for t in targets for s in sources),
        *(f"finetune {t}" for t in targets),
    }
    # the parent (and the experiment, found or created with it) came before any stage
    assert parent.info.start_time <= min(r.info.start_time for r in runs)

    cfg = params.finetune
    cells = [r for r in runs if "kind" in r.data.tags]
    found = Counter(
        (
            r.data.params["target"],
            r.data.params.get("source", ""),
            r.data.params["strategy"],
            r.data.params["budget"],
            int(r.data.params["seed"]),
        )
        for r in cells
    )
    budgets = [fraction_name(f) for f in cfg.fractions] + [shots_name(k) for k in cfg.shots]
    # scratch once per target (no source), every transfer strategy per source
    transfer = [s for s in cfg.strategies if s != "scratch"]
    arms = [("", "scratch"), *product(sources, transfer)]
    expected = Counter(
        (target, *arm, budget, seed)
        for target, arm, budget, seed in product(targets, arms, budgets, cfg.seeds)
    )
    assert found == expected, (
        f"duplicated: {sorted((found - expected).elements())}, "
        f"missing: {sorted((expected - found).elements())}\n{log}"
    )
    budget_runs = {r.info.run_id: r for r in runs if r.data.tags.get("level") == "budget"}
    assert len(budget_runs) == len(targets) * len(arms) * len(budgets)
    # nothing else, nothing orphaned
    assert len(runs) == 1 + len(stages) + len(budget_runs) + len(cells)
    for budget_run in budget_runs.values():
        stage = stages[f"finetune {budget_run.data.tags['target']}"]
        assert budget_run.data.tags[PARENT_TAG] == stage.info.run_id
    for cell in cells:
        assert cell.data.tags[PARENT_TAG] in budget_runs

    # the targets' fine-tuning stages were open at the same time: their records interleaved
    spans = [
        (stages[f"finetune {t}"].info.start_time, stages[f"finetune {t}"].info.end_time)
        for t in targets
    ]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans


def test_metrics_on_the_server_match_the_result_files(pipeline: dict[str, Any]) -> None:
    client: MlflowClient = pipeline["client"]
    workspace: Path = pipeline["workspace"]
    results = pd.concat(
        read_results(workspace / "data" / "results" / f"{t}.csv")
        for t in pipeline["params"].targets
    )
    by_cell = {(r.target, r.source, r.strategy, r.budget, r.seed): r for r in results.itertuples()}
    cells = [r for r in pipeline["runs"] if "kind" in r.data.tags]
    assert len(cells) == len(by_cell)
    for cell in cells:
        p = cell.data.params
        row = by_cell[p["target"], p.get("source", ""), p["strategy"], p["budget"], int(p["seed"])]
        # recorded to 7 significant digits
        assert cell.data.metrics["test/acc"] == pytest.approx(row.test_acc, rel=1e-6), (
            cell.info.run_name
        )
        assert int(p["n_labels"]) == row.n_labels
        if cell.data.tags["kind"] == "transfer":
            assert "gain_pts" in cell.data.metrics
        # one value per epoch trained, in order
        history = client.get_metric_history(cell.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(row.epochs_run)), cell.info.run_name
    pretrain = next(r for r in pipeline["runs"] if r.info.run_name == "pretrain digits")
    summary = json.loads(
        (workspace / "data" / "checkpoints" / "digits" / "backbone.json").read_text()
    )
    history = client.get_metric_history(pretrain.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(summary["epochs_run"]))
    assert pretrain.data.metrics["best/val_acc"] == pytest.approx(summary["val_acc"], rel=1e-6)


def test_artifacts_and_the_registered_backbone_go_through_the_server(
    pipeline: dict[str, Any], tmp_path: Path
) -> None:
    client: MlflowClient = pipeline["client"]
    runs, artifacts = pipeline["runs"], pipeline["artifacts"]
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    # proxied: the client holds an mlflow-artifacts: URI, the bytes live in the server's store
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
    listed = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "comparison.csv", "summary.csv", "verdicts.csv", "plots"} <= listed
    fetched = client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))
    report = (pipeline["workspace"] / "reports" / "report.md").read_bytes()
    assert Path(fetched).read_bytes() == report
    stored = [p for p in artifacts.rglob("report.md") if parent.info.run_id in p.parts]
    assert len(stored) == 1 and stored[0].read_bytes() == report

    pretrain = next(r for r in runs if r.info.run_name == "pretrain digits")
    registered = f"{pipeline['params'].registered_model}-digits"
    version, model, files = registered_backbone(client, registered)
    assert "MLmodel" in files and model.source_run_id == pretrain.info.run_id
    assert version.run_id == pretrain.info.run_id
    checkpoint = "dvc.md5.data/checkpoints/digits/backbone.pt"  # the lineage tag it registered
    assert version.tags[checkpoint] == pretrain.data.tags[checkpoint]


def test_executions_starting_together_share_one_new_experiment(
    server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Team members' runs may start at the same moment on an experiment nobody has created yet:
    each must find or create the same one, none fail."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    name, starters = f"race-{time.time_ns()}", 4
    gate = threading.Barrier(starters)
    outcomes: list[str | BaseException] = []

    def start() -> None:
        gate.wait()
        try:
            with start_pipeline_run(name, "cli", root=tmp_path) as run:
                outcomes.append(run.connection.experiment_id)
        except BaseException as err:  # any failure is reported by the assertion below
            outcomes.append(err)

    threads = [threading.Thread(target=start) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    client = MlflowClient(server["uri"])
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    assert outcomes == [experiment.experiment_id] * starters, log_tail(server["log"])
    assert len(client.search_runs([experiment.experiment_id])) == starters


def test_parallel_writers_lose_and_duplicate_no_run(
    server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads sharing one execution's parent (as the flow's tasks do) each record their runs,
    with params, a metric and a history, all at the same time."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["uri"])
    writers, each = 8, 5
    gate = threading.Barrier(writers)
    with start_pipeline_run(f"parallel-{time.time_ns()}", "cli", root=tmp_path) as parent:

        def write(writer: int) -> None:
            gate.wait()
            for index in range(each):
                with parent.child(f"w{writer}/{index}") as run:
                    run.log(
                        params={"writer": writer, "index": index},
                        metrics={"value": writer * 100 + index},
                    )
                    for epoch in range(3):
                        run.log(metrics={"loss": 1.0 / (epoch + 1)}, step=epoch)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert parent.connection.error is None, parent.connection.error + log_tail(server["log"])
    client = MlflowClient(server["uri"])
    children = client.search_runs(
        [parent.connection.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'",
        max_results=1000,
    )
    found = Counter((int(r.data.params["writer"]), int(r.data.params["index"])) for r in children)
    assert found == Counter(product(range(writers), range(each))), log_tail(server["log"])
    for run in children:
        p = run.data.params
        assert run.info.status == "FINISHED"
        assert run.data.metrics["value"] == int(p["writer"]) * 100 + int(p["index"])
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
