"""The command-line frame shared by every stage: params, logging, the MLflow parent, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tasks.datasets import DataError
from tasks.layout import Layout
from tasks.models import CheckpointError
from tasks.params import Params, ParamsError, load_params
from tasks.tracking import Run, join_stage_parent

# Errors whose message is the whole story for a user: printed on one line, no traceback.
USER_ERRORS = (ParamsError, DataError, CheckpointError)


def configure_logging() -> None:
    """Progress at INFO from our loggers; under Prefect its root handlers print them."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for ours in ("tasks", "flows", "__main__"):
        logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("alembic", "mlflow.store.db.utils"):
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


def run_stage(
    description: str,
    body: Callable[[Params, Layout, Run, argparse.Namespace], object],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse args, validate params before any work, run `body` under the MLflow parent run."""
    parser = params_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        params = load_params(args.params, args.overrides)
        with join_stage_parent(params.experiment) as parent:
            body(params, Layout(), parent, args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ParamsError) else 1)
