"""What a user opens after running the study twice against the team's servers, checked in a real
browser: MLflow's UI, Prefect's UI and the page `dvc plots show` writes.

The browser is Debian's `chromium` (which .ci/run installs; Playwright's own download has no
network here), driven by Playwright. The servers let no one in without credentials, as in the
README's team setup: MLflow's basic-auth app and Prefect's API auth string. A client without
them is refused, the pipeline records with them, and they appear in no log, tag, param or
command line. A failing browser test leaves a screenshot; the failure names its path.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient

from tasks.config.params import load_params
from tests.helpers import (
    REPO,
    free_port,
    log_tail,
    make_workspace,
    poll,
    run_command,
    spawn,
    stop,
)

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
# what a closed network needs: no background connections, which would be refused by the dozen
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VEGA = REPO / ".ci" / "vega" / "node_modules"  # .ci/run installs vega there, from npm
TIMEOUT_MS = 60_000  # per browser check: a loaded 2-core machine renders in seconds, not 60
OTHER_SPLIT = "split.seed=1"  # the first execution studies another split of the same data


@dataclass
class Team:
    """An MLflow server with basic auth and a Prefect server with an API auth string."""

    mlflow: str
    mlflow_user: str
    mlflow_password: str
    prefect: str
    prefect_auth: str
    logs: list[Path]
    seen_command_lines: set[str] = field(default_factory=set)

    def client_env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.mlflow,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_user,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "PREFECT_API_URL": f"{self.prefect}/api",
            "PREFECT_API_AUTH_STRING": self.prefect_auth,
        }

    @property
    def prefect_token(self) -> str:
        """The auth string as it travels: base64, in a Basic header or the UI's local storage."""
        return base64.b64encode(self.prefect_auth.encode()).decode()

    def secrets(self) -> list[str]:
        password = self.prefect_auth.split(":", 1)[1]
        return [self.mlflow_password, password, self.prefect_token]


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as answer:
        return answer.status == 200


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """Both servers on loopback, their secrets in files and the environment only (never on a
    command line, where `ps` shows them), started side by side."""
    root = tmp_path_factory.mktemp("team-servers")
    password, prefect_auth = secrets.token_urlsafe(12), f"team:{secrets.token_urlsafe(12)}"
    auth_ini = root / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a checked login is trusted for a minute: without it, each request pays a password
        # hash (a quarter of a second here), and a study makes hundreds of requests
        "auth_cache_ttl_seconds = 60\n"
    )
    auth_ini.chmod(0o600)
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_log, prefect_log = root / "mlflow-server.log", root / "prefect-server.log"
    mlflow = spawn(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        root,
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
        mlflow_log,
    )
    prefect = spawn(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ],
        root,
        {
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_API_AUTH_STRING": prefect_auth,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": "/api",  # the UI asks the server it came from, on any port
        },
        prefect_log,
    )
    try:
        mlflow_uri, prefect_uri = (
            f"http://127.0.0.1:{mlflow_port}",
            f"http://127.0.0.1:{prefect_port}",
        )
        poll(lambda: _answers(f"{mlflow_uri}/health"), mlflow, 180, "mlflow server", mlflow_log)
        poll(
            lambda: _answers(f"{prefect_uri}/api/health"),
            prefect,
            180,
            "prefect server",
            prefect_log,
        )
        found = Team(
            mlflow_uri, "admin", password, prefect_uri, prefect_auth, [mlflow_log, prefect_log]
        )
        yield found
    finally:
        stop(mlflow, signal.SIGTERM)
        stop(prefect, signal.SIGTERM)


@dataclass
class Study:
    workspace: Path
    outputs: list[str]  # what each execution printed
    client: MlflowClient
    experiment_id: str
    parents: list[Any]  # MLflow parent runs, newest first


def _watch_command_lines(team: Team, stop_watching: threading.Event) -> None:
    """Every command line on the machine while the study runs (what `ps` would show)."""
    while not stop_watching.wait(0.2):
        for process in psutil.process_iter(["cmdline"]):
            team.seen_command_lines.add(" ".join(process.info["cmdline"] or []))


@pytest.fixture(scope="module")
def study(team: Team, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """The tiny study run twice by the flow, recording on both servers, in a fresh clone (its
    dvc.lock names the default study's outputs, which its DVC cache does not hold): first on
    another split (`--set`: every stage runs, DVC records nothing), then as params.yaml says
    (recorded in DVC). `dvc plots show` after each."""
    root = tmp_path_factory.mktemp("ui")
    workspace = make_workspace(root / "ws", extra=("dvc.lock",))
    env = {**team.client_env(), "PREFECT_HOME": str(root / "client-home")}
    stop_watching = threading.Event()
    watcher = threading.Thread(target=_watch_command_lines, args=(team, stop_watching))
    watcher.start()
    outputs = []
    try:
        for extra in (["--set", OTHER_SPLIT], []):
            done = run_command(
                ["python", "-m", "flows.pipeline", *extra], cwd=workspace, env=env, timeout=600
            )
            output = done.stdout + done.stderr
            (root / f"run{len(outputs) + 1}.log").write_text(output)
            assert done.returncode == 0, output[-6000:] + "".join(map(log_tail, team.logs))
            outputs.append(output)
            plots = run_command(["dvc", "plots", "show"], cwd=workspace)
            outputs.append(plots.stdout + plots.stderr)
            page = workspace / "dvc_plots" / "index.html"
            assert plots.returncode == 0 and page.exists(), outputs[-1]
            # this run's curves, though dvc.lock may name another run's outputs
            shown = page.read_text()
            assert '"target": "shifted"' in shown and '"target": "shuffled"' not in shown
    finally:
        stop_watching.set()
        watcher.join()
    os.environ.update(
        MLFLOW_TRACKING_USERNAME=team.mlflow_user, MLFLOW_TRACKING_PASSWORD=team.mlflow_password
    )
    try:
        client = MlflowClient(team.mlflow)
        experiment = client.get_experiment_by_name(
            load_params(workspace / "params.yaml").experiment
        )
        parents = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.level = 'execution'",
            order_by=["attributes.start_time DESC"],
        )
        yield Study(workspace, outputs, client, experiment.experiment_id, parents)
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)


# --- the servers let no one in without credentials ----------------------------------------------


def _status(url: str, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def test_clients_without_credentials_are_refused(team: Team, tmp_path: Path) -> None:
    assert _status(f"{team.mlflow}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(f"{team.prefect}/api/flow_runs/filter", data=b"{}") == 401
    # the pipeline without MLflow credentials: one line, before any work
    workspace = make_workspace(tmp_path / "ws")
    env = {**team.client_env(), "PREFECT_HOME": str(tmp_path / "home")}
    env["MLFLOW_TRACKING_PASSWORD"] = "wrong"
    refused = run_command(["python", "-m", "flows.pipeline"], cwd=workspace, env=env)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: MLflow tracking server {team.mlflow} requires a login: MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD were refused"
    )
    assert "Traceback" not in refused.stderr
    assert not list((workspace / "data").rglob("*.npz"))  # nothing ran


def test_the_pipeline_records_with_credentials_that_appear_nowhere(
    team: Team, study: Study
) -> None:
    assert len(study.parents) == 2
    runs = study.client.search_runs([study.experiment_id], max_results=1000)
    recorded = json.dumps([[r.data.tags, r.data.params] for r in runs])
    for secret in team.secrets():
        assert secret not in recorded
        for output in study.outputs:
            assert secret not in output
        for log in team.logs:
            assert secret not in log.read_text(errors="replace")
        assert not [line for line in team.seen_command_lines if secret in line]
    assert len(team.seen_command_lines) > 10  # the watcher saw the machine's processes


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(
    browser: Any, team: Team, request: pytest.FixtureRequest, tmp_path_factory
) -> Iterator[Any]:
    """A fresh page that logs in to both servers as a user would have, gets vega (which the
    page of `dvc plots show` loads from a CDN) from the local npm copy, and is screenshot when
    the test fails."""
    context = browser.new_context(
        viewport={"width": 1600, "height": 1000},
        http_credentials={"username": team.mlflow_user, "password": team.mlflow_password},
    )
    context.set_default_timeout(TIMEOUT_MS)
    # what Prefect's login page stores once the auth string is typed in
    context.add_init_script(
        f"window.localStorage.setItem('prefect-password', '{team.prefect_token}')"
    )
    context.route(CDN, _local_vega)
    opened = context.new_page()
    yield opened
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        shot = tmp_path_factory.mktemp("screenshots") / f"{request.node.name}.png"
        opened.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failed page: {shot}")
    context.close()


CDN = re.compile(r"https://cdn\.jsdelivr\.net/npm/(vega(?:-lite|-embed)?)@[\d.]+$")


def _local_vega(route: Any) -> None:
    """vega from the local npm copy: the machine has no network (other outside requests, the
    UIs' telemetry, fail at once). Only this URL is routed: routing every request stalls
    MLflow's UI, whose web worker then never answers."""
    name = CDN.match(route.request.url)[1]
    script = VEGA / name / "build" / f"{name}.min.js"
    if not script.exists():
        pytest.fail(f"{script} is missing: .ci/run installs vega from npm")
    route.fulfill(path=str(script), content_type="application/javascript")


# --- MLflow --------------------------------------------------------------------------------------


def _readme_filters() -> dict[str, str]:
    """The run filters the README documents (its MLflow section), by level: the test checks
    exactly what a user would type."""
    found = re.findall(r"^(tags\.level = '(\w+)'.*)$", (REPO / "README.md").read_text(), re.M)
    return {level: text for text, level in found}


def _runs_page(team: Team, study: Study, **query: str) -> str:
    """The experiment's runs table in MLflow's model-training mode (its GenAI mode otherwise)."""
    encoded = urllib.parse.urlencode(
        {"workflowType": "machine_learning", **query}, quote_via=urllib.parse.quote
    )
    return f"{team.mlflow}/#/experiments/{study.experiment_id}/runs?{encoded}"


def test_mlflow_opens_on_the_runs_table_with_every_execution(
    team: Team, study: Study, page: Any
) -> None:
    from playwright.sync_api import expect

    names = [parent.info.run_name for parent in study.parents]
    assert len(set(names)) == 2 and all(name.endswith(" prefect") for name in names)
    # the runs table as it opens, with no filter: the newest execution's parent on its first
    # page (an execution records more runs than the page holds: the older one's parent is
    # pushed off, which is why the README's filter below exists)
    page.goto(_runs_page(team, study))
    expect(page.get_by_text(names[0], exact=True)).to_be_visible()
    # the link the flow prints: one row per execution, whatever the number of runs
    printed = re.search(r"^MLflow:  (\S+)", study.outputs[2], re.M)  # the second execution's
    assert printed, study.outputs[2][-2000:]
    assert printed[1] == _runs_page(team, study, searchFilter=_readme_filters()["execution"])
    page.goto(printed[1])
    expect(page.get_by_text("2 matching runs")).to_be_visible()
    for name in names:
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    # the backbone is a logged model: the experiment's Models tab lists it
    page.goto(_runs_page(team, study).replace("/runs?", "/models?"))
    expect(page.get_by_text("backbone", exact=True).first).to_be_visible()


def test_mlflow_filter_puts_transfer_beside_scratch(team: Team, study: Study, page: Any) -> None:
    """The README's filter for one target and budget, sorted by name (a flat list): every
    strategy of each execution, scratch among them."""
    from playwright.sync_api import expect

    budget_filter = _readme_filters()["budget"]
    sorted_by_name = {"orderByKey": "attributes.run_name", "orderByAsc": "true"}
    page.goto(_runs_page(team, study, searchFilter=budget_filter, **sorted_by_name))
    cell = re.search(r"tags.target = '(\w+)' and params.budget = '([^']+)'", budget_filter)
    target, budget = cell.groups()
    params = load_params(study.workspace / "params.yaml")
    arms = ["scratch"] + [
        f"{source}/{strategy}"
        for source in params.sources
        for strategy in params.finetune.strategies
        if strategy != "scratch"
    ]
    expect(page.get_by_text(f"{2 * len(arms)} matching runs")).to_be_visible()
    for arm in arms:
        expect(page.get_by_text(f"{target}/{arm}/{budget}", exact=True).first).to_be_visible()


def test_mlflow_compare_view_plots_accuracy_by_strategy(
    team: Team, study: Study, page: Any
) -> None:
    """The five strategies of one cell (target, budget, seed) of one execution, compared as
    the Compare button opens them: MLflow's default plot shows what tells the strategies apart
    (init, strategy, trains: params every run has) against test accuracy, and the details list
    the gain, 0 for scratch."""
    from playwright.sync_api import expect

    newest = study.parents[0].data.tags["prefect.flow_run_id"]
    runs = study.client.search_runs(
        [study.experiment_id],
        f"{_readme_filters()['seed']} and tags.`prefect.flow_run_id` = '{newest}'",
    )
    params = load_params(study.workspace / "params.yaml")
    strategies = params.finetune.strategies  # scratch once, the others once per source
    expected = ["scratch"] + [s for s in strategies if s != "scratch"] * len(params.sources)
    assert sorted(r.data.tags["strategy"] for r in runs) == sorted(expected)
    scratch = next(r for r in runs if r.data.tags["strategy"] == "scratch")
    assert scratch.data.metrics["gain_pts"] == 0
    query = urllib.parse.urlencode(
        {
            "runs": json.dumps([r.info.run_id for r in runs]),
            "experiments": json.dumps([study.experiment_id]),
        }
    )
    page.goto(f"{team.mlflow}/#/compare-runs?{query}")
    titles = page.locator("svg text.axis-title")
    expect(titles).to_have_count(4)
    # the first params that differ, alphabetically: where the run started, from which source
    assert titles.all_text_contents() == ["init", "source", "strategy", "test/acc"]
    expect(page.get_by_text("gain_pts", exact=True).first).to_be_visible()


def test_mlflow_shows_the_html_report_with_its_figures(
    team: Team, study: Study, page: Any
) -> None:
    from playwright.sync_api import expect

    parent = study.parents[0]
    page.goto(
        f"{team.mlflow}/#/experiments/{study.experiment_id}/runs/{parent.info.run_id}"
        "/artifacts/report.html?workflowType=machine_learning"
    )
    report = page.frame_locator("iframe.mlflow-html-iframe")
    expect(report.get_by_role("heading", name="Verdict")).to_be_visible()
    figures = report.locator("img")
    # curves, gains and features per target, and the scores against the gains
    expect(figures).to_have_count(3 * 2 + 1)
    loaded = figures.evaluate_all("images => images.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * 7


# --- Prefect -------------------------------------------------------------------------------------


def _prefect_api(team: Team, path: str, body: dict) -> Any:
    request = urllib.request.Request(
        f"{team.prefect}/api/{path}",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Basic {team.prefect_token}",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_prefect_ui_shows_the_flow_run_its_tasks_and_verdicts(
    team: Team, study: Study, page: Any
) -> None:
    from playwright.sync_api import expect

    first = study.parents[-1]  # the first execution: --set split.seed=1
    flow_run = first.data.tags["prefect.flow_run_id"]
    page.goto(f"{team.prefect}/runs/flow-run/{flow_run}")  # the link the flow logs
    # the flow run is named for the params file and overrides it ran
    expect(page.get_by_text(f"params.yaml --set {OTHER_SPLIT}").first).to_be_visible()
    page.get_by_role("tablist").get_by_text("Task Runs", exact=True).click()
    tasks = ("prepare", "pretrain/digits", "pretrain/views", "extract/new_classes", "compare")
    for name in tasks:
        link = page.locator("a[href*='/runs/task-run/']", has_text=re.compile(f"^{name}$"))
        expect(link.first).to_be_visible()
    [artifact] = _prefect_api(
        team,
        "artifacts/filter",
        {
            "artifacts": {
                "key": {"any_": ["transfer-vs-scratch"]},
                "flow_run_id": {"any_": [flow_run]},
            }
        },
    )
    page.goto(f"{team.prefect}/artifacts/artifact/{artifact['id']}")
    cells = page.locator("table").first.locator("tbody td")
    expect(cells.first).to_be_visible()
    shown = cells.all_inner_texts()
    for target in ("new_classes", "shifted"):
        assert target in shown
    verdicts = {"helps", "hurts", "no significant difference", "no variation across seeds"}
    assert verdicts & set(shown)


# --- DVC -----------------------------------------------------------------------------------------


def test_dvc_plots_show_in_a_fresh_clone_draws_the_workspaces_results(tmp_path: Path) -> None:
    """A fresh clone's dvc.lock names outputs its DVC cache does not hold (until `dvc pull`, or
    after a run DVC does not record: another params file, `--set`). `dvc plots show` still
    draws the comparison on disk. (It used to exit 0 with no page: the PNG folder was a plots
    output, which DVC lists through the lock's hash and the cache.)"""
    workspace = make_workspace(tmp_path / "ws", extra=("dvc.lock",))
    rows = [
        f"mine,{strategy},{strategy},{n},0.{n},0.{n - 1},0.{n + 1},{gain},{gain - 5},{gain + 5}"
        for strategy, gain in [("scratch", 0), ("finetune", 12)]
        for n in (20, 40)
    ]
    header = "target,strategy,arm,n_labels,test_acc_mean,test_acc_ci_low,test_acc_ci_high,"
    header += "gain_pts,gain_pts_ci_low,gain_pts_ci_high"
    (workspace / "reports").mkdir()
    (workspace / "reports/comparison.csv").write_text("\n".join([header, *rows]) + "\n")
    shown = run_command(["dvc", "plots", "show"], cwd=workspace)
    page = workspace / "dvc_plots" / "index.html"
    assert shown.returncode == 0 and page.exists(), shown.stdout + shown.stderr
    assert page.read_text().count('"target": "mine"') == 2 * len(rows)  # both plots, every row


def test_dvc_plots_show_draws_interactive_curves(study: Study, page: Any) -> None:
    """After a flow run in a fresh workspace, `dvc plots show` writes a page whose two charts
    (learning curves, gains) draw: vega renders them into canvases that are not blank."""
    from playwright.sync_api import expect

    index = study.workspace / "dvc_plots" / "index.html"
    assert index.exists(), study.outputs[-1]
    page.goto(index.as_uri())
    charts = page.locator(".vega-embed canvas")
    expect(charts).to_have_count(2)
    drawn = page.evaluate(
        """() => [...document.querySelectorAll('.vega-embed canvas')].map(canvas => {
            const blank = document.createElement('canvas');
            blank.width = canvas.width; blank.height = canvas.height;
            return canvas.width > 100 && canvas.toDataURL() !== blank.toDataURL();
        })"""
    )
    assert drawn == [True, True]
