"""Scheduled runs: serve the pipeline flow as a Prefect deployment, against a Prefect server.

    prefect server start --host 127.0.0.1 --port 4200          # once, in its own terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --cron "0 2 * * *"                  # serves until stopped

`flow.serve` rather than a prefect.yaml with a work pool: the deployment runs where the
workspace is (the DVC repo, its cache, the MLflow store), with no worker or image to manage; each
run is a subprocess of this one. A global concurrency limit of 1 queues a run triggered while
another is running instead of letting two write one workspace at once. Every run is versioned by
DVC like a `dvc repro` (tasks/recording/versioning.py).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from tasks import frame
from tasks.workspace.layout import Layout


def main(argv: list[str] | None = None) -> None:
    parser = frame.parser("Serve the pipeline as a scheduled Prefect deployment.")
    parser.add_argument("--cron", help="schedule, e.g. '0 2 * * *' (default: flow.cron)")
    parser.add_argument("--name", help="deployment name (default: flow.deployment)")
    args = parser.parse_args(argv)

    checked: list[Any] = []

    def body() -> None:
        params = frame.load(args)  # refuse bad params and data before serving
        frame.preflight(params, Layout())
        if not os.environ.get("PREFECT_API_URL"):
            raise frame.ServiceError(
                "schedules need a Prefect server: start one (`prefect server start`) and set "
                "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api"
            )
        from flows.runners import task_runner

        checked.append(task_runner(params.flow))  # and a runner that cannot be built
        checked.append(params)

    frame.command(body)
    runner, params = checked
    # Serving is Prefect's own loop: on Ctrl-C it pauses the deployment and cancels its runs
    # itself (each run is a process of its own, in the frame of flows.study).
    for signum, handler in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
    ):
        signal.signal(signum, handler)
    from flows.study import transfer_study

    transfer_study.with_options(task_runner=runner).serve(
        name=args.name or params.flow.deployment,
        cron=args.cron or params.flow.cron,
        parameters={"params_path": str(args.params), "overrides": args.overrides},
        global_limit=1,  # one run at a time per workspace; later triggers wait their turn
    )


if __name__ == "__main__":
    main()
