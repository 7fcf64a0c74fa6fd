"""Helpers for tests that run the pipeline as a user would: a scratch workspace, real commands."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "params.tiny.yaml"
# What a workspace needs to run the pipeline both ways: the code, the DVC graph and config.
WORKSPACE_FILES = [
    "tasks",
    "flows",
    "dvc.yaml",
    ".dvc/config",
    ".dvc/plots",
    ".dvcignore",
    ".gitignore",
    "data/raw/.gitkeep",
    "data/synthesized/.gitkeep",
]


def make_workspace(path: Path, params_file: Path = TINY, extra: tuple[str, ...] = ()) -> Path:
    """A fresh git + DVC workspace holding the pipeline's code and `params_file` as params.yaml
    (and the repository's `extra` files: "dvc.lock" makes it a fresh clone's)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in [*WORKSPACE_FILES, *extra]:
        source, dest = REPO / name, path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest)
    shutil.copy2(params_file, path / "params.yaml")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=path, check=True)
    subprocess.run([*git, "commit", "-qm", "workspace"], cwd=path, check=True)
    return path


def run_state_env(workspace: Path, prefect_home: Path) -> dict[str, str]:
    """The environment of a run with its own MLflow store (in `workspace`) and Prefect home."""
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
        "PREFECT_HOME": str(prefect_home),
    }


def run_command(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a command as a user would, with this interpreter's environment first on PATH."""
    # git needs an identity for `dvc exp run`, which CI's machine may not have configured
    identity = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "test"), ("EMAIL", "test@example.com"))
    }
    env = {**identity, **os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def digest(root: Path) -> dict[str, str]:
    """md5 of every file under data/ and reports/: what "nothing changed" is checked against."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for folder in ("data", "reports")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


# Measured seconds (pretraining's and each run's share of its group's), which differ between
# executions by nature: the files that hold them, and the report's section that quotes them.
MEASURED = ("data/timings/*", "reports/compute.csv")
MEASURED_SECTION = {"report.md": "## Compute saved", "report.html": "<h2>Compute saved</h2>"}


def results_digest(root: Path) -> dict[str, str]:
    """`digest`, where two executions must agree: the same, but the reports' line naming their
    execution (an MLflow run id, different in every execution) and what holds measured seconds
    are left out."""
    found = {
        name: md5
        for name, md5 in digest(root).items()
        if not any(fnmatch.fnmatch(name, pattern) for pattern in MEASURED)
    }
    for name, line_start in [("report.md", "Execution: "), ("report.html", "<p>Execution: ")]:
        report = (root / "reports" / name).read_text()
        start = report.index(MEASURED_SECTION[name])
        end = report.index("<h2>" if name.endswith(".html") else "\n## ", start + 1)
        report = report[:start] + report[end:]
        kept = "\n".join(line for line in report.splitlines() if not line.startswith(line_start))
        found[f"reports/{name}"] = hashlib.md5(kept.encode()).hexdigest()
    return found


def free_port() -> int:
    """A loopback port nobody listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, size: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} (last {size} characters) ---\n{text[-size:]}"


def poll(
    ready: Callable[[], Any], process: subprocess.Popen, timeout: float, what: str, log: Path
) -> None:
    """Wait until `ready()` answers truthily; fail at once, with the log, if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}\n{log_tail(log)}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f} s\n{log_tail(log)}")


def stop(process: subprocess.Popen, signum: int) -> None:
    """Stop a server started in its own session, with its workers; kill it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def registered_backbone(client: Any, name: str) -> tuple[Any, Any, set[str]]:
    """The version of `name` that the alias `current` points at, the logged model it registers
    (MLflow 3: the experiment's Models tab lists it) and that model's files."""
    version = client.get_model_version_by_alias(name, "current")
    assert version.source.startswith("models:/"), version.source
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    return version, model, files


def spawn(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A server in a session of its own (so that `stop` ends it with its workers), its output
    to `log`."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command's error: its last line on stderr (progress logs may stand before it)."""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line
