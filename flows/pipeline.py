"""Run the whole transfer study as a Prefect flow (flows/study.py), from the command line:

    python -m flows.pipeline [--params params.yaml] [--set finetune.seeds=[0,1,2]]
                             [--task-runner dask [--workers 2 | --dask-address tcp://host:8786]]

Everything that can be known to fail is checked before Prefect is even imported: params, every
user data file, the output folders, the tracking store and the workspace lock. A bad input then
costs a second or two and one `error:` line, and changes nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import threading
from pathlib import Path

from tasks import frame
from tasks.config.params import DEFAULT_PARAMS
from tasks.recording.store import tracking_uri
from tasks.workspace.layout import Layout
from tasks.workspace.lock import workspace_lock

EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def main(argv: list[str] | None = None) -> None:
    parser = frame.parser("Run the whole transfer study as a Prefect flow.")
    parser.add_argument(
        "--task-runner",
        choices=["threads", "dask"],
        help="where fine-tuning groups run (default: flow.task_runner)",
    )
    parser.add_argument("--workers", type=int, help="parallel groups (default: flow.workers)")
    parser.add_argument(
        "--dask-address",
        help="a Dask scheduler, e.g. tcp://host:8786 "
        "(default: flow.dask_address; none: a LocalCluster of --workers)",
    )
    args = parser.parse_args(argv)
    for key in ("task_runner", "workers", "dask_address"):  # the flags are flow.* overrides
        if getattr(args, key) is not None:
            args.overrides.append(f"flow.{key}={getattr(args, key)}")
    done: dict[str, str] = {}  # what the body leaves for the closing lines

    def body() -> None:
        params = frame.load(args)
        done["experiment"] = params.experiment
        frame.preflight(params, Layout())
        with workspace_lock():  # a busy workspace is refused before Prefect starts, too
            booting = _boot_prefect_server()  # seconds in its own process: meanwhile...
            from tasks.recording.tracking import open_store

            open_store()  # ...a new tracking store creates its tables, and the stages import
            from prefect.exceptions import TerminationSignal

            from flows import study
            from flows.runners import task_runner

            study.FROM_COMMAND_LINE = True
            flow = study.transfer_study.with_options(task_runner=task_runner(params.flow))
            try:
                booting.join()
                done["verdicts"] = flow(str(args.params), args.overrides)
            except TerminationSignal:  # Prefect's SIGTERM handler, before ours is back in place
                raise frame.Terminated() from None
            except RuntimeError as err:
                if EPHEMERAL_TIMEOUT not in str(err):
                    raise
                raise frame.ServiceError(_start_failure(str(err))) from None

    frame.command(body)
    print(f"\n{done['verdicts']}\n")
    print("Report:  reports/report.md, or report.html (verdicts, learning curves, method); tables")
    print("         and plots in reports/{comparison,summary,verdicts}.csv, reports/plots/*.png")
    from tasks.recording.tracking import runs_page  # imported by the flow already

    if not tracking_uri().startswith(("http://", "https://")):
        print(f"MLflow:  mlflow ui --backend-store-uri {tracking_uri()}, then open")
    print(f"MLflow:  {runs_page(done['experiment'])}   (one row per execution)")
    print(f"DVC:     {_versioning_hint(args.params, args.overrides)}")


def _versioning_hint(params_path: Path, overrides: list[str]) -> str:
    """How to reproduce this run with DVC: `dvc repro` does for params.yaml as it is; a run with
    another params file or `--set` is not in dvc.lock (flow.* settings never change results)."""
    study = [o for o in overrides if not o.startswith("flow.")]
    if params_path != DEFAULT_PARAMS:
        return (
            f"dvc versions params.yaml only: this run used {params_path}; to version it, put "
            "its values in params.yaml and run `dvc exp run`"
        )
    if study:
        sets = " ".join(f"-S {shlex.quote(o)}" for o in study)
        return f"this run's --set values are not in dvc.lock; to version it: dvc exp run {sets}"
    return "dvc metrics show   |   dvc repro reproduces the same numbers"


class _Boot(threading.Thread):
    """Start Prefect's temporary API server, as the flow would when it first needs it, but now:
    the server boots in a process of its own (3.5 to 7 s on 2 cores) while this one imports
    the stages and opens the tracking store, instead of after. `join` raises what start raised."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        # imported here, in the main thread: imports from two threads at once can deadlock
        import prefect.main  # noqa: F401  (sets up Prefect's logging: the server's start is told)
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import get_current_settings

        self.server = None if get_current_settings().api.url else SubprocessASGIServer()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.server is not None:  # none to start when the user runs a Prefect server
                self.server.start()
        except BaseException as err:
            self.error = err

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


def _boot_prefect_server() -> _Boot:
    boot = _Boot()
    boot.start()
    return boot


def _start_failure(reason: str) -> str:
    waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    exited = re.search(r"exited with code (-?\d+)", reason)
    how = f"exited with code {exited[1]}" if exited else f"did not start within {waited} s"
    return (
        f"Prefect's temporary API server {how} (is the machine busy?); nothing was run. "
        "Run the command again, raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a Prefect server once "
        "(`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


if __name__ == "__main__":
    main()
