"""Where the flow's fine-tuning groups run: Prefect's thread pool, or Dask workers.

- `threads` (the default): `workers` threads of the flow's own process. torch releases the GIL
  in its kernels, so groups train in parallel; set `runtime.threads` x `workers` to the cores.
- `dask`, through prefect-dask: the scheduler at `dask_address` (a cluster your team already
  runs: `dask scheduler` plus `dask worker` on each machine, dask-kubernetes, dask-jobqueue...),
  or, without an address, a `LocalCluster` of `workers` single-threaded worker processes on
  this machine. Workers need this project installed (the same code and torch), nothing else:
  each group gets its arrays and the checkpoint as arguments and sends its cells back, and the
  flow writes every file, MLflow record and DVC entry (flows/pipeline.py).
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.params import FlowParams, ParamsError


def task_runner(cfg: FlowParams) -> TaskRunner:
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    try:
        from prefect_dask import DaskTaskRunner  # the optional extra: pip install -e '.[dask]'
    except ImportError as err:
        raise ParamsError(
            "flow.task_runner: 'dask' needs prefect-dask; install it with pip install -e '.[dask]'"
        ) from err
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    # one thread per worker process: torch's own threads come from runtime.threads
    cluster = {"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs=cluster)
