"""Bad input meets a clear error and loses nothing, checked as a user meets it: through the real
command line, on a workspace that already holds a finished run's outputs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.helpers import digest, free_port, one_line_error, run_command

pytestmark = pytest.mark.slow
FLOW = ["python", "-m", "flows.pipeline"]


def edit_params(workspace: Path, edit) -> Path:
    doc = yaml.safe_load((workspace / "params.yaml").read_text())
    edit(doc)
    path = workspace / "bad.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# Every message is checked in-process (tests/test_params.py, tests/test_datasets.py); these few
# cases show what the command line does with them: one line, exit 2, before any work.
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["finetune"].update(sedds=[1]), "finetune.sedds: unknown key"),
        (lambda d: d["pretrain"].update(lr="fast"), "pretrain.lr: Input should be a valid number"),
        (
            lambda d: d["targets"].update(mine={"kind": "npz", "path": "data/raw/none.npz"}),
            "targets.mine.path: file 'data/raw/none.npz' does not exist",
        ),
    ],
)
def test_bad_params_are_refused_before_any_work(workspace: Path, edit, message: str) -> None:
    bad = edit_params(workspace, edit)
    before = digest(workspace)
    started = time.monotonic()
    result = run_command([*FLOW, "--params", "bad.yaml"], cwd=workspace)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1  # nothing but the one line
    assert one_line_error(result).startswith(f"error: {bad.name}: {message}")
    assert time.monotonic() - started < 30 and "Starting temporary server" not in result.stderr
    assert digest(workspace) == before


def test_duplicate_target_names_and_yaml_syntax(workspace: Path) -> None:
    text = (workspace / "params.yaml").read_text()
    (workspace / "dup.yaml").write_text(text.replace("  shifted:\n", "  new_classes:\n", 1))
    (workspace / "broken.yaml").write_text(text.replace("finetune:\n", "finetune: [\n", 1))
    before = digest(workspace)
    duplicate = run_command([*FLOW, "--params", "dup.yaml"], cwd=workspace)
    assert duplicate.returncode == 2
    assert "dup.yaml: YAML does not parse" in one_line_error(duplicate)
    assert "duplicate key 'new_classes'" in duplicate.stderr
    broken = run_command([*FLOW, "--params", "broken.yaml"], cwd=workspace)
    assert broken.returncode == 2
    assert one_line_error(broken).startswith("error: broken.yaml: YAML does not parse at line")
    assert digest(workspace) == before


def test_bad_overrides_on_the_command_line_and_through_dvc(workspace: Path) -> None:
    before = digest(workspace)
    flow = run_command([*FLOW, "--set", "finetune.fractions=[0, 1]"], cwd=workspace)
    assert flow.returncode == 2
    assert one_line_error(flow) == (
        "error: params.yaml: finetune.fractions.0: Input should be greater than 0 (got 0)"
    )
    # `dvc exp run -S` writes the value into params.yaml, then the stage refuses it; the
    # outputs persist (dvc.yaml), so DVC does not delete them first either.
    dvc = run_command(
        ["python", "-m", "dvc", "exp", "run", "-S", "finetune.max_epochs=0"], cwd=workspace
    )
    assert dvc.returncode != 0
    assert "params.yaml: finetune.max_epochs: Input should be greater than 0" in dvc.stderr
    assert digest(workspace) == before


def test_a_params_yaml_written_before_the_audio_section_is_refused_by_key(workspace) -> None:
    """A user's params.yaml from before `audio` came: refused in one line saying what to add,
    before any work (DVC would refuse it after the flow's first stage had run)."""
    params = workspace / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    del doc["audio"]
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = digest(workspace)
    result = run_command(FLOW, cwd=workspace)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert one_line_error(result).startswith("error: params.yaml: audio: missing; dvc.yaml reads")
    assert digest(workspace) == before


def truncated_npz(path: Path) -> None:
    np.savez(path, x=np.zeros((90, 8)), y=np.arange(90) % 3)
    path.write_bytes(path.read_bytes()[:300])  # a download cut short


# Every check of user data has its in-process test (tests/test_datasets.py); these are the
# malformed files a user brings, through the command a user runs: the flow checks every data
# file before Prefect starts, so each fails in about a second, in one line, changing nothing.
MALFORMED = {
    "nan": ({"x": np.full((90, 8), np.nan), "y": np.arange(90) % 3}, "has NaN or inf values"),
    "rows": ({"x": np.zeros((90, 8)), "y": np.arange(91) % 3}, "'x' has 90 rows but 'y' has 91"),
    "fractional": ({"x": np.zeros((90, 8)), "y": np.arange(90) % 3 + 0.5}, "not whole numbers"),
    "unequal": (
        {"x": np.r_[np.zeros((89, 8)), [[1, 2, 3] + [np.nan] * 5]], "y": np.arange(90) % 3},
        "unequal_lengths: resample",
    ),
    "missing y": ({"x": np.zeros((90, 8))}, "missing array 'y'"),
    "ndim": ({"x": np.zeros((90, 3, 8, 2)), "y": np.arange(90) % 3}, "must have shape (N, L)"),
    "too few": ({"x": np.zeros((90, 8)), "y": np.r_[np.zeros(88, int), 1, 1]}, "class 1 has 2"),
    "empty": (b"", "file is empty"),
    "truncated": (truncated_npz, "not a readable .npz file"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_data_fails_in_one_line_before_prefect_starts(workspace: Path, case) -> None:
    content, problem = MALFORMED[case]
    mine = workspace / "data/raw/mine.npz"
    if isinstance(content, bytes):
        mine.write_bytes(content)
    elif callable(content):
        content(mine)
    else:
        np.savez(mine, **content)
    edit = {"kind": "npz", "path": "data/raw/mine.npz"}
    edit_params(workspace, lambda d: d["targets"].update(mine=edit))
    before = digest(workspace)
    started = time.monotonic()
    result = run_command([*FLOW, "--params", "bad.yaml"], cwd=workspace)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and not result.stdout  # the one line, nothing else
    line = one_line_error(result)
    assert "data/raw/mine.npz" in line and problem in line
    assert elapsed < 5  # about 1 s here: no Prefect, no torch, no tracking store
    assert digest(workspace) == before


def test_a_stage_command_names_bad_data_too(workspace: Path) -> None:
    np.savez(workspace / "data/raw/mine.npz", y=np.zeros(90, int))
    edit = {"kind": "npz", "path": "data/raw/mine.npz"}
    edit_params(workspace, lambda d: d["targets"].update(mine=edit))
    before = digest(workspace)
    result = run_command(["python", "-m", "tasks.prepare", "--params", "bad.yaml"], cwd=workspace)
    assert result.returncode == 1
    assert one_line_error(result) == "error: data/raw/mine.npz: missing array 'x' (found: ['y'])"
    assert digest(workspace) == before


# The flow's own command line, with one target's fine-tuning broken: a failure in a target's
# grid that no pre-flight check can see (a bug, a lost worker, data no check anticipated).
BROKEN_FLOW = """
import sys
import tasks.finetune as finetune
from tasks.data.datasets import DataError
healthy = finetune.train_cells
def broken(data, *rest):
    if data.name == "broken":
        raise DataError(f"targets.broken: injected failure in {data.name}'s grid")
    return healthy(data, *rest)
finetune.train_cells = broken
from flows.pipeline import main
main(sys.argv[1:])
"""


def test_a_failing_target_beside_a_good_one(workspace: Path) -> None:
    """One target fails inside a Prefect task: the other is still fine-tuned and compared, the
    report lists the failed one with its error, and the command exits 1 with one `error:` line
    (no traceback, no retry: the same input would fail the same way)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 30)).astype(np.float32)  # length 30; the source's is 40
    np.savez(workspace / "data/raw/short.npz", x=x, y=np.arange(90) % 3)

    def edit(doc: dict) -> None:
        short = {"kind": "npz", "path": "data/raw/short.npz"}
        doc["targets"] = {"short": short, "broken": short}
        doc["flow"] |= {"retries": 2, "retry_delay_seconds": 30}
        doc["pretrain"] |= {"max_epochs": 1}  # any backbone will do
        doc["finetune"] |= {"strategies": ["scratch", "finetune"], "shots": []}  # a short grid

    edit_params(workspace, edit)
    old_report = (workspace / "reports/report.md").read_text()
    command = ["python", "-c", BROKEN_FLOW, "--params", "bad.yaml"]
    result = run_command(command, cwd=workspace)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output and "Retry 1/2" not in output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: 1 of 2 targets failed (reports/report.md compares the others and lists the "
        "failed): broken: targets.broken: injected failure in broken's grid"
    ]
    report = (workspace / "reports/report.md").read_text()
    assert report != old_report
    assert "- `broken`: targets.broken: injected failure in broken's grid" in report
    assert "## short" in report and "## broken" not in report
    verdicts = (workspace / "reports/verdicts.csv").read_text()
    assert "short" in verdicts and "broken" not in verdicts
    # a target of another length than the source's just works (the backbone pools over time)
    assert (workspace / "data/results/short.csv").exists()


class _Exploit:
    def __reduce__(self):
        return (Path("pwned").touch, ())


@pytest.mark.parametrize("damage", ["truncate", "foreign", "malicious"])
def test_damaged_checkpoint_is_refused_by_name(workspace: Path, damage: str) -> None:
    checkpoint = workspace / "data/checkpoints/digits/backbone.pt"
    if damage == "truncate":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif damage == "foreign":
        payload = torch.load(checkpoint, weights_only=True)
        payload["arch"]["channels"] = [16, 16]  # declares an architecture it does not hold
        torch.save(payload, checkpoint)
    else:
        torch.save(
            {"format": 1, "arch": {}, "num_classes": 2, "state_dict": _Exploit()}, checkpoint
        )
    before = digest(workspace)
    result = run_command(["python", "-m", "tasks.extract", "--target", "shifted"], cwd=workspace)
    assert result.returncode == 1
    expected = {
        "truncate": "truncated or corrupt",
        "foreign": "weights do not fit",
        "malicious": "refused to load",
    }[damage]
    assert one_line_error(result).startswith("error: data/checkpoints/digits/backbone.pt: ")
    assert expected in result.stderr
    assert not (workspace / "pwned").exists()  # the pickle's code never ran
    assert digest(workspace) == before


def test_unreachable_tracking_server_fails_fast_and_by_name(workspace: Path) -> None:
    before = digest(workspace)
    started = time.monotonic()
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens there
    result = run_command(FLOW, cwd=workspace, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1 and time.monotonic() - started < 20
    assert one_line_error(result).startswith(f"error: MLflow tracking server {uri} is unreachable")
    assert digest(workspace) == before


def test_tracking_server_dying_mid_run_loses_no_result(workspace: Path, tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(  # its own process group: mlflow server starts uvicorn under it
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
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = MlflowClient(uri)
        for _ in range(120):
            try:
                client.search_experiments()
                break
            except Exception:
                time.sleep(0.5)

        def kill_when_finetune_starts() -> None:
            for _ in range(600):
                try:
                    if client.search_runs(
                        [e.experiment_id for e in client.search_experiments()],
                        filter_string="tags.stage = 'finetune'",
                    ):
                        break
                except Exception:
                    pass
                time.sleep(0.1)
            os.killpg(server.pid, signal.SIGKILL)

        (workspace / "data/results/shifted.csv").unlink()
        watcher = threading.Thread(target=kill_when_finetune_starts)
        watcher.start()
        result = run_command(
            ["python", "-m", "tasks.finetune", "--target", "shifted"],
            cwd=workspace,
            env={"MLFLOW_TRACKING_URI": uri},
        )
        watcher.join()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    assert result.returncode == 1
    assert one_line_error(result).startswith(f"error: MLflow tracking at {uri} failed during")
    assert "the result files were written" in result.stderr
    rows = (workspace / "data/results/shifted.csv").read_text().strip().splitlines()
    assert (
        len(rows) == 1 + (1 + 4 * 2) * 2 * 2
    )  # header + (scratch + 4 x 2 sources) x budgets x seeds


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


@pytest.mark.parametrize("trouble", ["read-only", "full"])
def test_unwritable_or_full_output_folder(workspace: Path, trouble: str) -> None:
    results = workspace / "data/results"
    saved = {p.name: p.read_bytes() for p in results.glob("*.csv")}
    shutil.rmtree(results)
    mount_tmpfs(results, "size=64k")
    try:
        for name, content in saved.items():
            (results / name).write_bytes(content)
        if trouble == "full":
            with open(results / "filler", "wb") as filler, contextlib.suppress(OSError):
                filler.write(b"\0" * 10**6)  # until the disk is full
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(results)], check=True)
        before = digest(workspace)
        result = run_command(
            ["python", "-m", "tasks.finetune", "--target", "shifted"], cwd=workspace
        )
        reason = "Read-only file system" if trouble == "read-only" else "No space left on device"
        assert result.returncode == 1
        assert one_line_error(result) == (
            f"error: data/results: output folder is not writable ({reason}); nothing was changed"
        )
        assert digest(workspace) == before
        assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(results)], check=False)
