"""Pretraining on several processes: torchrun and DistributedDataParallel.

With `pretrain.processes: N` > 1 the stage runs itself again as N processes on this machine,
`python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.pretrain`, and waits
for them (`launch`); on several machines, torchrun is started by hand on each (README). Every
process is a rank (`rank_command`): it trains on its share of each batch
(tasks.learning.train.Shard), and the ranks' gradients are averaged (NCCL on CUDA, gloo on CPU).
Only rank 0 writes the checkpoint, the resume state and the metrics, and records; the other
ranks record nothing.

The launcher holds what every stage command holds (tasks/frame.py): the workspace lock and the
execution's parent record (the flow's, the one of `dvc repro`, or its own). It hands the parent
to rank 0 in LAUNCH_ENV, so that the one `pretrain` run is recorded under it, and rank 0 leaves
the lock to the launcher. Started by hand, rank 0 runs in an execution of its own, as any stage
command does.
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
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from tasks import frame
from tasks.config.params import Params, ParamsError
from tasks.learning import runtime
from tasks.learning.train import Shard
from tasks.recording.recorder import Recorder
from tasks.workspace.layout import Layout

# Set by `launch` for the ranks it starts: JSON of the workspace root and the MLflow parent.
LAUNCH_ENV = "TRANSFER_STUDY_LAUNCHER"

log = logging.getLogger(__name__)


def is_worker() -> bool:
    """Whether this process is one rank of a torchrun (or other env:// launcher) job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(params: Params, source: str, layout: Layout, recorder: Recorder) -> dict[str, float]:
    """Run the pretrain stage of `source` as `pretrain.processes` ranks on this machine and
    wait for them; return the summary that rank 0 wrote. Stopping this process stops the
    ranks."""
    processes = params.pretrain.processes
    _check_device(runtime.resolve_device(params.runtime.device), processes)
    handover = {"root": str(layout.root), "parent": recorder.handover()}
    # The ranks read the params they are handed, validated as any params file.
    with tempfile.TemporaryDirectory(prefix="pretrain-params-") as folder:
        params_file = Path(folder) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *(f"--nproc-per-node={processes}", "-m", "tasks.pretrain"),
            *("--params", str(params_file), "--source", source),
        ]
        env = {
            **os.environ,
            LAUNCH_ENV: json.dumps(handover),
            # what each rank sets anyway; said here, torchrun does not warn that it chose 1
            "OMP_NUM_THREADS": str(params.runtime.threads),
        }
        log.info("pretraining on %d processes under torchrun", processes)
        code = _wait(subprocess.Popen(command, env=env, cwd=layout.root))
    if code != 0:
        raise frame.LaunchError(
            f"pretraining on {processes} processes under torchrun failed (exit code {code}); "
            "the ranks' errors are printed above"
        )
    return json.loads(layout.checkpoint_meta(source).read_text())


def _wait(process: subprocess.Popen) -> int:
    """The launched torchrun's exit code. If this process is stopped meanwhile (Ctrl-C,
    SIGTERM, a cancelled flow), torchrun is stopped too: it passes SIGTERM on to the ranks,
    whose runs then end KILLED, with the last complete epoch kept for a rerun (the frame sends
    every child process SIGTERM as well, tasks/frame.py)."""
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        raise


def rank_command(
    description: str,
    stage: Callable[[Params, str, Layout, Recorder], object],
    argv: list[str] | None,
) -> None:
    """One rank's command line, in the frame (tasks/frame.py). Rank 0 records under the
    launcher's parent and leaves it and the lock to the launcher; started by hand, it runs in
    an execution of its own. The other ranks record nothing."""
    args = frame.parser(description, per="source").parse_args(argv)
    rank = int(os.environ["RANK"])
    handover = os.environ.get(LAUNCH_ENV)

    def body() -> None:
        if rank > 0:  # rank 0 reports the progress
            for ours in ("tasks", "__main__"):
                logging.getLogger(ours).setLevel(logging.WARNING)
        params = frame.load(args)
        if rank > 0:
            stage(params, args.source, Layout(), Recorder())
        elif handover is None:
            with frame.execution(params, "stage") as run:
                stage(params, args.source, run.layout, run.recorder)
        else:
            from tasks.recording.tracking import adopt

            launcher = json.loads(handover)
            parent = adopt(launcher["parent"])
            stage(params, args.source, Layout(Path(launcher["root"])), parent)
            frame.raise_if_tracking_failed(parent)

    frame.command(body)


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
