"""Helpers for tests that run the pipeline as a user would: a scratch workspace, real commands."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "params.tiny.yaml"
# What a workspace needs to run the pipeline both ways: the code, the DVC graph and config.
WORKSPACE_FILES = [
    "tasks",
    "flows",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "data/raw/.gitkeep",
]


def make_workspace(path: Path, params_file: Path = TINY) -> Path:
    """A fresh git + DVC workspace holding the pipeline's code and `params_file` as params.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for name in WORKSPACE_FILES:
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


def results_digest(root: Path) -> dict[str, str]:
    """`digest`, where two executions must agree: the same, but the report's line naming its
    execution (an MLflow run id, different in every execution) is left out."""
    found = digest(root)
    report = (root / "reports/report.md").read_text().splitlines()
    kept = "\n".join(line for line in report if not line.startswith("Execution: MLflow run"))
    found["reports/report.md"] = hashlib.md5(kept.encode()).hexdigest()
    return found


def free_port() -> int:
    """A loopback port nobody listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
