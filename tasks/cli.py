"""The command-line frame shared by every stage: params, logging, the MLflow parent, exit codes."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from tasks.config.params import Params, ParamsError, load_params
from tasks.data.datasets import DataError
from tasks.models.classifier import CheckpointError
from tasks.recording.tracking import Run, TrackingError, join_stage_parent, tracking_uri
from tasks.workspace.files import OutputError
from tasks.workspace.layout import Layout
from tasks.workspace.lock import WorkspaceBusy, workspace_lock

# Errors whose message is the whole story for a user: printed on one line, no traceback.
USER_ERRORS = (ParamsError, DataError, CheckpointError, OutputError, TrackingError, WorkspaceBusy)


def configure_logging() -> None:
    """Progress at INFO from our loggers; under Prefect its root handlers print them."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for ours in ("tasks", "flows", "__main__"):
        logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("alembic", "mlflow.store.db.utils", "dvc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def params_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set finetune.seeds=[0,1,2] (repeatable)",
    )
    return parser


def check_target(params: Params, target: str) -> None:
    if target not in params.targets:
        raise ParamsError(f"--target {target!r} is not in targets ({', '.join(params.targets)})")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a killed `dvc`, a cancelled deployment), raised like Ctrl-C so that the same
    cleanup runs: open MLflow runs end as KILLED, written files stay as they are."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)


def interrupted(err: KeyboardInterrupt) -> NoReturn:
    """Say what was kept and exit as a signal would: 130 for Ctrl-C, 143 for SIGTERM."""
    print(
        "interrupted: finished outputs and the last complete epoch are kept; run the same "
        "command again to resume",
        file=sys.stderr,
    )
    sys.exit(143 if isinstance(err, Terminated) else 130)


def run_stage(
    description: str,
    body: Callable[..., object],
    argv: list[str] | None = None,
    per_target: bool = False,
) -> None:
    """Parse args, validate params before any work, run `body` under the MLflow parent run.

    `body(params, layout, run)`, or `body(params, target, layout, run)` when `per_target`.
    """
    parser = params_parser(description)
    if per_target:
        parser.add_argument("--target", required=True, help="a name from params' targets")
    args = parser.parse_args(argv)
    configure_logging()
    exit_on_sigterm()
    try:
        params = load_params(args.params, args.overrides)
        target_args = [args.target] if per_target else []
        if per_target:
            check_target(params, args.target)
        with workspace_lock(), join_stage_parent(params.experiment) as parent:
            body(params, *target_args, Layout(), parent)
        raise_if_tracking_failed(parent)
    except USER_ERRORS as err:
        fail(err)
    except KeyboardInterrupt as err:
        interrupted(err)


def raise_if_tracking_failed(parent: Run) -> None:
    """After the results are written: a tracking failure mid-run is still a failed command."""
    if parent.connection.error is not None:
        raise TrackingError(
            f"MLflow tracking at {tracking_uri()} failed during the run "
            f"({parent.connection.error}); the result files were written, but MLflow's records "
            "of this run are incomplete"
        )


def fail(err: Exception) -> NoReturn:
    """Print a user error on one line and exit: 2 for bad params, 1 for anything else."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2 if isinstance(err, ParamsError) else 1)
