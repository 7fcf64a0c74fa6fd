"""Where the flow's fine-tuning groups run: Prefect's thread pool, or Dask workers.

- `threads` (the default): `workers` threads of the flow's own process; set `runtime.threads` x
  `workers` to the cores. torch releases the GIL inside its kernels, but the ensemble's step has
  Python between them, so threads overlap only partly; processes (Dask) do not share a GIL.
- `dask`, through prefect-dask: the scheduler at `dask_address` (a cluster your team already
  runs: `dask scheduler` plus `dask worker` on each machine, dask-kubernetes, dask-jobqueue...),
  or, without an address, a `LocalCluster` of `workers` single-threaded worker processes on
  this machine. Workers need this project installed (the same code and torch) and must reach the
  flow's Prefect API, where each group reports its task run; nothing else: each group gets its
  arrays and the checkpoint as arguments and sends its cells back, and the flow writes every
  file, MLflow record and DVC entry (flows/study.py).
"""

from __future__ import annotations

import os

from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.config.params import FlowParams, ParamsError


def task_runner(cfg: FlowParams) -> TaskRunner:
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    try:  # the optional extra: pip install -e '.[dask]'
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise ParamsError(
            "flow.task_runner: 'dask' needs prefect-dask; install it with pip install -e '.[dask]'"
        ) from err
    if cfg.dask_address:
        if not os.environ.get("PREFECT_API_URL"):
            raise ParamsError(
                "flow.dask_address: workers on other machines report their task runs to the "
                "flow's Prefect server, and the flow has none: start one (`prefect server "
                "start --host 0.0.0.0`) and set PREFECT_API_URL to an address they can reach"
            )
        return DaskTaskRunner(address=cfg.dask_address)
    # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands memory
    # back to the OS after nearly every small torch allocation, and a group takes 2.5x as long
    # (measured: 12.5 s against 4.9 s in-process, most of it system time). None unsets it.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    # one thread per worker process: torch's own threads come from runtime.threads
    cluster = {"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs=cluster)


def share_api_with_local_workers() -> None:
    """Point the worker processes a LocalCluster is about to start at this flow's Prefect API.

    Call it inside the flow, before the first task is submitted (prefect-dask starts the
    cluster then, and its processes inherit this environment). Without a PREFECT_API_URL, the
    flow talks to a temporary server of its own, and each worker would start another one (10 s
    each, and task runs the flow's UI never shows).
    """
    if os.environ.get("PREFECT_API_URL") or get_current_settings().api.url:
        return
    from prefect.server.api.server import SubprocessASGIServer

    os.environ["PREFECT_API_URL"] = SubprocessASGIServer().api_url  # the flow's own server
