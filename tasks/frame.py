"""The execution frame: everything around a stage call, written once for every driver.

The drivers are a stage's command (`python -m tasks.<stage>`, what `dvc repro` runs), a torchrun
rank (tasks/learning/distributed.py), the Prefect flow (`python -m flows.pipeline`) and its
served deployment (`python -m flows.serve`). Each runs its body through `command`, and its
stages inside an `Execution`. The frame owns:

- the command line (`--params`, `--set`), logging, and loading params before any work;
- pre-flight: params, every user data file (the checks `prepare` makes, without writing),
  output folders and the tracking store, checked before Prefect or any training starts;
- the workspace lock: one execution per workspace at a time;
- the parent record of the execution, under which every stage records (tasks/recording/), and
  the tracking-failure policy: a store that fails mid-run costs no result file, but the
  command then exits 1 saying its records are incomplete;
- Ctrl-C and SIGTERM: open records end KILLED and the process exits 130 or 143 within seconds,
  wherever the signal lands (mid-epoch, mid-save, inside a tracking call);
- user errors: one `error:` line and exit 2 for params, 1 otherwise; anything unexpected keeps
  its traceback;
- recording in DVC, for the flow: each stage runs only when DVC finds it stale, and its outputs
  are committed after it runs (tasks/recording/versioning.py).

Nothing here imports torch, the tracking library or Prefect at module level: a refused command
exits before paying for them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tasks.config.params import Params, ParamsError, load_params
from tasks.data.datasets import DataError
from tasks.data.sources import check_user_data
from tasks.data.synthesis import check_corpus
from tasks.models.errors import CheckpointError
from tasks.models.shapes import check_targets_fit
from tasks.recording.recorder import Recorder
from tasks.recording.store import TrackingError, check_tracking, tracking_uri
from tasks.recording.versioning import Versioning
from tasks.workspace.files import OutputError, check_writable
from tasks.workspace.layout import Layout
from tasks.workspace.lock import WorkspaceBusy, workspace_lock

log = logging.getLogger(__name__)
T = TypeVar("T")


class LaunchError(RuntimeError):
    """Processes a stage started failed; their own errors were printed above."""


class ServiceError(RuntimeError):
    """A service the execution needs did not start; the message says what to do."""


class TargetsFailed(RuntimeError):
    """Some targets failed (their errors were logged where they happened); the others were
    compared."""


# Errors whose message is the whole story for a user: printed on one line, no traceback, and
# never retried (the same input fails the same way).
USER_ERRORS = (
    ParamsError,
    DataError,
    CheckpointError,
    OutputError,
    TrackingError,
    WorkspaceBusy,
    LaunchError,
    ServiceError,
    TargetsFailed,
)
STOP_GRACE_S = 1.5  # after a signal, how long the main thread gets to unwind before we leave
END_RUNS_S = 2.0  # then how long ending the open records as KILLED may take


def configure_logging() -> None:
    """Progress at INFO from our loggers; under Prefect its root handlers print them."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for ours in ("tasks", "flows", "__main__"):
        logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("alembic", "dvc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# A stage that runs once per entry of a params section takes the entry's name: --target NAME
PER_SECTION = {"target": "targets", "source": "sources", "corpus": "synthesis"}


def parser(description: str, per: str | None = None) -> argparse.ArgumentParser:
    """The arguments every command takes: the params file and overrides (and, for a stage that
    runs per target, source or corpus, `--target`, `--source` or `--corpus`: `per`)."""
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
    if per is not None:
        parser.add_argument(
            f"--{per}", required=True, help=f"a name from params' {PER_SECTION[per]}"
        )
    return parser


def load(args: argparse.Namespace) -> Params:
    """The params a command was given, checked (and its `--target` or `--source`, if any)."""
    params = load_params(args.params, args.overrides)
    for per, section in PER_SECTION.items():
        name, names = getattr(args, per, None), getattr(params, section)
        if name is not None and name not in names:
            listed = ", ".join(names) or "none"
            raise ParamsError(f"--{per} {name!r} is not in {section} ({listed})")
    return params


def preflight(params: Params, layout: Layout) -> None:
    """What can be known to fail before any work: every synthesizer the corpora need, every
    user data file (read and checked as `prepare` will), the output folders and the tracking
    store. Seconds, never minutes."""
    for name, spec in params.synthesis.items():
        check_corpus(spec, f"synthesis.{name}")
    shapes = check_user_data(params)
    for source in [s for s in params.sources if s in shapes]:  # a joint one's: its members'
        for note in check_targets_fit(params.model, shapes, source, params.targets):
            log.warning("%s: %s", source, note)
    if params.model.backbone == "timm":  # every dataset's examples are of one shape
        check_image_model(params, next(iter(shapes.values())))
    check_writable(
        *([layout.corpora] if params.synthesis else []),
        *(layout.prepared(s).parent for s in params.sources),
        *(layout.checkpoint(s).parent for s in params.sources),
        layout.reports,
        *(layout.features(t, s) for t in params.targets for s in params.sources),
        *(layout.results(t).parent for t in params.targets),
    )
    check_tracking(tracking_uri())


def check_image_model(params: Params, shape: tuple[int, ...]) -> None:
    """An image study's model on its examples of `shape` (C, H, W): the timm architecture
    builds with its args, `partial` leaves it a stage to train, and every augmentation is a
    torchvision transform that takes its args on such an image.
    (The stages check the same when they come to it; here it costs a second, not a stage.)"""
    from tasks.learning.augment import build_augmentation  # torchvision: a slow import
    from tasks.models.classifier import build_classifier
    from tasks.models.shapes import architecture

    # built as the stages will (a seeded init for every layer, or one line naming the layer)
    model = build_classifier(architecture(params.model, shape), num_classes=2, seed=0)
    try:
        params.finetune.check_partial(len(model.backbone.blocks))
    except ValueError as err:
        raise ParamsError(str(err)) from err
    for section in ("pretrain", "finetune"):
        build_augmentation(getattr(params, section).augment, f"{section}.augment", shape)


# --- the process: signals, errors and exit codes ----------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM (a killed `dvc`, a cancelled deployment), raised like Ctrl-C so that the same
    cleanup runs: open records end as KILLED, written files stay as they are."""


_stopping = threading.Event()
_leaving = threading.Lock()


def command(body: Callable[[], object]) -> None:
    """Run a command's body in the frame: a signal stops it within seconds, a user error is one
    line, anything else keeps its traceback."""
    configure_logging()
    install_stop_handlers()
    try:
        body()
    except USER_ERRORS as err:
        fail(err)
    except KeyboardInterrupt as err:
        leave(143 if isinstance(err, Terminated) else 130)
    # The interpreter's last full garbage collection walks the libraries' ~400k objects: 1.5 to
    # 4 s of exit on 2 busy cores, for nothing (no object of ours needs it). Exit hooks still
    # run: Prefect stops its temporary server and sends its last logs.
    gc.freeze()


def install_stop_handlers() -> None:
    """Ctrl-C and SIGTERM stop this process promptly (again after a library swapped its own in:
    Prefect does for a flow run)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)


def _stop(signum: int, frame: object) -> None:
    """Raise in the main thread, so that the work unwinds (a tracking call releases its database
    lock, records end KILLED); if it has not left after a short grace (a library waiting for
    its threads, a blocking call), a watchdog leaves for it."""
    if _stopping.is_set():
        return  # a second Ctrl-C while stopping changes nothing
    _stopping.set()
    code = 128 + signum
    threading.Thread(target=_leave_after, args=(code,), daemon=True).start()
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _leave_after(code: int) -> None:
    time.sleep(STOP_GRACE_S)
    leave(code)


def leave(code: int) -> NoReturn:
    """End the open records as KILLED, stop our child processes, say what was kept, and exit at
    once: finished outputs are complete files (writes are atomic) and a rerun resumes. No
    interpreter shutdown: its exit hooks (tracking stores, thread pools) can take seconds."""
    with _leaving:
        ender = threading.Thread(target=_end_open_records, daemon=True)
        ender.start()
        ender.join(END_RUNS_S)  # a store that hangs does not hold the exit
        _terminate_children()
        print(
            "interrupted: finished outputs and the last complete epoch are kept; run the same "
            "command again to resume",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _end_open_records() -> None:
    tracking = sys.modules.get("tasks.recording.tracking")  # only if something recorded
    if tracking is not None:
        tracking.end_all_open_runs("KILLED")


def _terminate_children() -> None:
    """Our child processes (torchrun and its ranks, Prefect's server, Dask workers) get SIGTERM
    and stop on their own terms: each rank ends its own records as KILLED."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.terminate()


def fail(err: BaseException) -> NoReturn:
    """Print a user error on one line and exit: 2 for bad params, 1 for anything else."""
    print(f"error: {err}", file=sys.stderr)
    gc.freeze()  # as after a success: no final collection over the libraries' objects
    sys.exit(2 if isinstance(err, ParamsError) else 1)


def is_user_error(err: BaseException | None) -> bool:
    return isinstance(err, USER_ERRORS)


# --- one execution: lock, parent record, DVC ----------------------------------------------------


@dataclass
class Execution:
    """One pipeline execution in one workspace: the params, where files go, the parent record
    every stage records under, and DVC's view (which stages to run, and recording them)."""

    params: Params
    layout: Layout
    recorder: Recorder
    versioning: Versioning

    def run(self, name: str, stage: Callable[..., T], *args: Any) -> T | None:
        """Run `stage(params, *args, layout, recorder)` if DVC finds `name` stale (always, when
        versioning is off), then record its outputs; None when it was up to date."""
        if not self.versioning.is_stale(name):
            return None
        result = stage(self.params, *args, self.layout, self.recorder)
        self.versioning.record(name)
        return result


@contextlib.contextmanager
def execution(
    params: Params,
    orchestrator: str,
    execution_id: str | None = None,
    layout: Layout | None = None,
    versioning: Versioning | None = None,
) -> Iterator[Execution]:
    """Hold the workspace, open the execution's parent record (a stage command joins the one of
    its `dvc repro`; see tasks/recording/tracking.py), and end it with the right status. After a
    normal end, a tracking failure during the run is raised: the results are written, but the
    records are not complete."""
    from tasks.recording import tracking  # seconds of import: only once the work is due

    layout = layout or Layout()
    origin = params.origin
    # what the execution ran, as its parent's name says: the params file and any overrides
    label = run_label(origin.path, origin.overrides) if origin else "params in code"
    with workspace_lock(layout.root):
        if orchestrator == "stage":
            parent = tracking.join_stage_parent(params.experiment, label)
        else:
            parent = tracking.start_pipeline_run(
                params.experiment, orchestrator, execution_id, layout.root, label
            )
        with parent:
            parent.log(params=execution_params(params))
            off = Versioning(layout.root, enabled=False)
            yield Execution(params, layout, parent, versioning or off)
    raise_if_tracking_failed(parent)


def run_label(params_path: str | Path, overrides: Sequence[str]) -> str:
    """What an execution ran, as its MLflow parent and Prefect flow run are named: the params
    file's name and the overrides, `params.quick.yaml --set split.seed=1`."""
    return " ".join([Path(params_path).name, *(f"--set {o}" for o in overrides)])


def execution_params(params: Params) -> dict[str, str]:
    """What the parent record says of its execution's inputs, to compare executions by: the
    params file, its hash and overrides, and the data it studied."""
    origin = params.origin
    return {
        "params_file": origin.path if origin else "(in code)",
        "params_sha256": origin.sha256[:12] if origin else "",
        "overrides": " ".join(origin.overrides) if origin else "",
        "sources": ", ".join(params.sources),
        "targets": ", ".join(params.targets),
    }


def raise_if_tracking_failed(recorder: Recorder) -> None:
    if recorder.failure() is not None:
        raise TrackingError(
            f"MLflow tracking at {tracking_uri()} failed during the run ({recorder.failure()}); "
            "the result files were written, but the records of this run are incomplete"
        )


def stage_command(
    description: str,
    stage: Callable[..., object],
    argv: list[str] | None = None,
    per: str | None = None,
) -> None:
    """A stage's command line, what `dvc repro` runs: `stage(params, [name,] layout,
    recorder)`, with the `--target`, `--source` or `--corpus` name for a stage that runs `per`
    one, in an execution of its own (or of its `dvc repro`)."""
    args = parser(description, per).parse_args(argv)

    def body() -> None:
        params = load(args)
        with execution(params, "stage") as run:  # checks the tracking store first
            name = [getattr(args, per)] if per else []
            stage(params, *name, run.layout, run.recorder)

    command(body)
