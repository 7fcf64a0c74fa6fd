"""Pretraining on several processes: torchrun and DistributedDataParallel.

With `pretrain.processes: N` > 1 the stage runs itself again as N processes on this machine,
`python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.pretrain`, and waits
for them (`launch`); on several machines, torchrun is started by hand on each (README). Every
process is a rank (`worker_main`): it trains on its share of each batch (tasks.train.Shard),
and the ranks' gradients are averaged (NCCL on CUDA, gloo on CPU). Only rank 0 writes the
checkpoint, the resume state and the metrics, and records to MLflow; the other ranks never
touch MLflow.

The launcher holds what every stage command holds: the workspace lock and the MLflow parent run
(the flow's, the one of `dvc repro`, or its own). It hands the parent to rank 0 in LAUNCH_ENV,
so that the one `pretrain` run is recorded under it, and rank 0 leaves the lock to the launcher.
Started by hand, rank 0 takes the lock and joins a parent as any stage command does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from mlflow import MlflowClient

from tasks.cli import (
    USER_ERRORS,
    configure_logging,
    exit_on_sigterm,
    fail,
    interrupted,
    params_parser,
    raise_if_tracking_failed,
)
from tasks.config.params import Params, ParamsError, load_params
from tasks.learning import runtime
from tasks.learning.train import Shard
from tasks.recording.tracking import (
    Connection,
    NullRun,
    Run,
    check_tracking,
    join_stage_parent,
    tracking_uri,
)
from tasks.workspace.layout import Layout
from tasks.workspace.lock import workspace_lock

# Set by `launch` for the ranks it starts: JSON of the workspace root and the MLflow parent.
LAUNCH_ENV = "TRANSFER_STUDY_LAUNCHER"
STOP_GRACE_S = 30  # how long stopped ranks get to end their MLflow runs before they are killed

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The ranks started by `launch` failed; their own errors were printed above."""


def is_worker() -> bool:
    """Whether this process is one rank of a torchrun (or other env:// launcher) job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(params: Params, layout: Layout, run: Run) -> dict[str, float]:
    """Run the pretrain stage as `pretrain.processes` ranks on this machine and wait for them;
    return the summary that rank 0 wrote. Stopping this process stops the ranks."""
    processes = params.pretrain.processes
    _check_device(runtime.resolve_device(params.runtime.device), processes)
    handover = {
        "root": str(layout.root),
        # a store that failed already gets no more records, as in this process
        "parent": run.run_id if run.connection.error is None else None,
        "experiment": run.connection.experiment_id,
        "tags": run.connection.base_tags,  # lineage: commit, orchestrator, flow run id
    }
    # The ranks read the params they are handed, validated as any params file.
    with tempfile.TemporaryDirectory(prefix="pretrain-params-") as folder:
        params_file = Path(folder) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "tasks.pretrain", "--params", str(params_file),
        ]  # fmt: skip
        env = {
            **os.environ,
            LAUNCH_ENV: json.dumps(handover),
            # what each rank sets anyway; said here, torchrun does not warn that it chose 1
            "OMP_NUM_THREADS": str(params.runtime.threads),
        }
        log.info("pretraining on %d processes under torchrun", processes)
        code = _wait(subprocess.Popen(command, env=env, cwd=layout.root))
    if code != 0:
        raise LaunchError(
            f"pretraining on {processes} processes under torchrun failed (exit code {code}); "
            "the ranks' errors are printed above"
        )
    return json.loads(layout.checkpoint_meta.read_text())


def _wait(process: subprocess.Popen) -> int:
    """The launched torchrun's exit code. If this process is stopped meanwhile (Ctrl-C,
    SIGTERM, a cancelled flow), torchrun is stopped too: it passes SIGTERM on to the ranks,
    whose runs then end KILLED, with the last complete epoch kept for a rerun."""
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def worker_main(
    description: str, body: Callable[[Params, Layout, Run], object], argv: list[str] | None
) -> None:
    """One rank's command line: `tasks.cli.run_stage`'s frame, except that only rank 0 takes
    the workspace lock (unless its launcher holds it) and an MLflow parent."""
    args = params_parser(description).parse_args(argv)
    configure_logging()
    exit_on_sigterm()
    rank = int(os.environ["RANK"])
    if rank > 0:  # rank 0 reports the progress
        for ours in ("tasks", "__main__"):
            logging.getLogger(ours).setLevel(logging.WARNING)
    launcher = _launcher()
    layout = Layout(Path(launcher["root"])) if launcher else Layout()
    try:
        params = load_params(args.params, args.overrides)
        if rank > 0:
            body(params, layout, NullRun())
            return
        lock = contextlib.nullcontext() if launcher else workspace_lock(layout.root)
        with lock, _rank0_parent(params, launcher) as parent:
            body(params, layout, parent)
        raise_if_tracking_failed(parent)
    except USER_ERRORS as err:
        fail(err)
    except KeyboardInterrupt as err:
        interrupted(err)


def _launcher() -> dict[str, Any] | None:
    """What `launch` handed over, or None when torchrun was started by hand."""
    handover = os.environ.get(LAUNCH_ENV)
    return json.loads(handover) if handover else None


def _rank0_parent(params: Params, launcher: dict[str, Any] | None) -> AbstractContextManager[Run]:
    """Rank 0's MLflow parent: the launcher's (left open: the launcher ends it), else the one
    a stage command joins (ended here)."""
    if launcher is None:
        return join_stage_parent(params.experiment)
    if launcher["parent"] is None:
        return contextlib.nullcontext(NullRun())
    uri = tracking_uri()
    check_tracking(uri)
    connection = Connection(
        MlflowClient(uri), launcher["experiment"], Path(launcher["root"]), launcher["tags"]
    )
    return contextlib.nullcontext(Run(connection, launcher["parent"]))


@contextlib.contextmanager
def ranks(params: Params) -> Iterator[tuple[torch.device, Shard]]:
    """This process's device and share of the training: all of it outside torchrun; under
    torchrun, one rank's, in a process group (NCCL on CUDA, gloo on CPU) for the duration."""
    device = runtime.configure(params.runtime)
    if not is_worker():
        yield device, Shard()
        return
    world, processes = int(os.environ["WORLD_SIZE"]), params.pretrain.processes
    if world != processes:
        raise ParamsError(
            f"pretrain.processes is {processes} but torchrun started {world} processes; set "
            f"--set pretrain.processes={world} (the result depends on it)"
        )
    device = _rank_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// from torchrun
    try:
        yield device, Shard(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _rank_device(device: torch.device) -> torch.device:
    """This rank's device: the CPU, or one GPU per rank of this machine (LOCAL_RANK)."""
    _check_device(device, int(os.environ["LOCAL_WORLD_SIZE"]))
    if device.type == "cpu":
        return device
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _check_device(device: torch.device, local_processes: int) -> None:
    """Several processes train on the CPU (gloo) or on CUDA, one GPU each (NCCL)."""
    if device.type not in ("cpu", "cuda"):
        raise ParamsError(
            f"runtime.device: several processes train on cuda or cpu, not {device.type}"
        )
    if device.type == "cuda" and local_processes > torch.cuda.device_count():
        raise ParamsError(
            f"pretrain.processes: {local_processes} processes on this machine, but it has "
            f"{torch.cuda.device_count()} CUDA devices (one per process)"
        )
