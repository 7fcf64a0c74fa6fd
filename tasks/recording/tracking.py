"""The recorder backed by MLflow: one parent run per pipeline execution, stage and fine-tuning
runs nested below. The one module that talks to MLflow: stages see only the Recorder interface
(tasks/recording/recorder.py).

Everything goes through `MlflowClient` with explicit run ids, never the fluent API's active-run
stack, which is per thread and would lose the parent inside Prefect's thread pool. Metrics are
written in batches (one `log_batch` call costs about as much as one `log_metric`).

Which parent a stage joins:
- the Prefect flow creates the parent and hands it to every task;
- under `dvc repro`, each stage is its own process: the stages of one repro find their shared
  parent by a tag holding the pid and start time of the `dvc` process that launched them;
- a stage run by hand gets a parent of its own.

Tracking never costs a result. The URI is checked before any work (an unreachable server fails
in seconds, naming it). If the store fails later, the first error is kept, further records are
skipped, the stage still writes its result files, and the command then exits with that error.
When a pipeline is interrupted or fails, every run it left open is ended KILLED or FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from tasks.recording.lineage import MD5_TAG, git_state, input_tags
from tasks.recording.recorder import LEVEL, Recorder
from tasks.recording.store import TrackingError, check_tracking, tracking_uri

EXECUTION_TAG = "pipeline.execution"
PARENT_TAG = "mlflow.parentRunId"
MODEL_ALIAS = "current"  # the newest registered backbone ("latest" is reserved by MLflow)
CONTENT_TAG = "content_md5"  # a registered version's checkpoint hash: one version per content
# The experiment kind MLflow's UI reads to choose its layout (its own value for model training)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_BATCH = 1000  # MLflow's limit of items per log_batch request (of them params: 100)

log = logging.getLogger(__name__)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # a line per store opened


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _value(number: float) -> float:
    """A metric as recorded: 7 significant digits, float32's precision, so that the UI shows
    0.2733333 and not a float's tail of noise."""
    return float(f"{float(number):.7g}")


class Connection:
    """One pipeline execution's link to MLflow, shared by all its runs (and threads): the client,
    the runs still open, and the first tracking error, after which records are skipped."""

    def __init__(
        self,
        client: MlflowClient | None,
        experiment_id: str,
        root: Path = Path("."),
        base_tags: dict[str, str] | None = None,
    ):
        self.client, self.experiment_id = client, experiment_id
        self.root = root  # the workspace: input paths are tagged relative to it
        self.base_tags = base_tags or {}  # lineage every run carries: commit, orchestrator
        self.error: str | None = None
        self.open: dict[str, str] = {}  # run id -> name, for runs not ended yet
        self._lock = threading.Lock()
        _CONNECTIONS.add(self)

    def call(self, method: str, *args: Any, exists_ok: bool = False, **kwargs: Any) -> Any:
        """Call an MlflowClient method; None without a client or after the first failure.
        With `exists_ok`, a create that finds its object already there (another execution on
        a shared server made it since we looked) is not a failure."""
        if self.client is None or self.error is not None:
            return None
        with _signals_held():
            try:
                return getattr(self.client, method)(*args, **kwargs)
            except Exception as err:  # MLflow raises many kinds (HTTP, SQL, OS): all mean "lost"
                if not (exists_ok and _already_exists(err)):
                    self.fail(err)
                return None

    def fail(self, err: Exception) -> None:
        """Keep the first tracking error; every later record is skipped."""
        with self._lock:
            if self.error is None:
                self.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                log.error(
                    "MLflow tracking at %s failed, records from now on are skipped "
                    "(results are still written to files): %s",
                    tracking_uri(),
                    self.error,
                )

    def end_open_runs(self, status: str) -> None:
        """End every run still open (in any thread) with `status`: KILLED or FAILED."""
        with self._lock:
            stranded = list(self.open)
        for run_id in stranded:
            self.call("set_terminated", run_id, status=status)
            self.open.pop(run_id, None)


_CONNECTIONS: weakref.WeakSet[Connection] = weakref.WeakSet()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until a sqlite store's call in the main thread returns
    (milliseconds). Raised inside SQLAlchemy, KeyboardInterrupt leaves the write transaction
    open (an "exit exception": no rollback), so writing KILLED next waits out sqlite's 20 s busy
    timeout and fails with "database is locked" (measured: 2 stops in 12). A server's store
    (HTTP, or a database over the network, which may hang) takes a signal at once."""
    if threading.current_thread() is not threading.main_thread() or not tracking_uri().startswith(
        "sqlite:"
    ):
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: held.append(signum)) for s in _STOPS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])  # now, to the handler the caller had


_STOPS = (signal.SIGINT, signal.SIGTERM)


def end_all_open_runs(status: str) -> None:
    """End every run this process left open, in any thread (for a process about to stop)."""
    for connection in list(_CONNECTIONS):
        connection.end_open_runs(status)


class Run(Recorder):
    """One MLflow run, addressed by id; a context manager that ends it with the right status."""

    def __init__(
        self,
        connection: Connection,
        run_id: str | None,
        top_level: bool = False,
        started_ms: int | None = None,
    ):
        self.connection, self.run_id, self.top_level = connection, run_id, top_level
        self.started_ms = started_ms  # a parent's: its `wall_time_s` runs from there

    def child(
        self, name: str, tags: dict[str, str] | None = None, inputs: Sequence[Path] = ()
    ) -> Run:
        """A new run nested under this one; `inputs` (files it reads) are tagged with their DVC
        hashes and logged as MLflow datasets with that hash as digest."""
        return self._create(name, tags, inputs)

    def finished(
        self,
        name: str,
        started: float,
        ended: float,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        history: Sequence[dict[str, float]] = (),
        epoch_ends: Sequence[float] = (),
        inputs: Sequence[Path] = (),
    ) -> Run:
        """A nested run of work done between `started` and `ended`: MLflow's Duration column
        shows that time, and each epoch of `history` is stamped when it ended."""
        run = self._create(name, tags, inputs, start_ms=_ms(started))
        if run.run_id is None:
            return run
        stamps = [_ms(t) for t in epoch_ends] or [_ms(ended)] * len(history)
        curve = [
            Metric(k, _value(v), stamp, epoch)
            for epoch, (values, stamp) in enumerate(zip(history, stamps, strict=False))
            for k, v in values.items()
        ]
        summary = [Metric(k, _value(v), _ms(ended), 0) for k, v in (metrics or {}).items()]
        run._batch(summary + curve, [Param(k, str(v)) for k, v in (params or {}).items()], [])
        self.connection.call("set_terminated", run.run_id, status="FINISHED", end_time=_ms(ended))
        self.connection.open.pop(run.run_id, None)
        return run

    def _create(
        self,
        name: str,
        tags: dict[str, str] | None,
        inputs: Sequence[Path],
        start_ms: int | None = None,
    ) -> Run:
        connection = self.connection
        if connection.client is None or self.run_id is None:
            return Run(connection, None)
        lineage = input_tags(connection.root, list(inputs))
        created = connection.call(
            "create_run",
            connection.experiment_id,
            run_name=name,
            start_time=start_ms,
            tags={PARENT_TAG: self.run_id, **connection.base_tags, **lineage, **(tags or {})},
        )
        if created is None:
            return Run(connection, None)
        run_id = created.info.run_id
        connection.open[run_id] = name
        if lineage:
            datasets = [
                DatasetInput(
                    Dataset(
                        name=key.removeprefix(MD5_TAG),
                        digest=digest,
                        source_type="dvc",
                        source=key.removeprefix(MD5_TAG),
                    )
                )
                for key, digest in lineage.items()
            ]
            connection.call("log_inputs", run_id, datasets=datasets)
        return Run(connection, run_id)

    def log(
        self,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """Params, metrics (at one step) and tags in one batched request."""
        stamp = _now_ms()
        self._batch(
            [Metric(k, _value(v), stamp, step) for k, v in (metrics or {}).items()],
            [Param(k, str(v)) for k, v in (params or {}).items()],
            [RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def _batch(self, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        if self.run_id is None:
            return
        while metrics or params or tags:
            # MLflow takes at most 1000 items per request (metrics, params and tags together)
            # and 100 of them params
            room = _BATCH - len(params[:100]) - len(tags[:100])
            self.connection.call(
                "log_batch", self.run_id, metrics[:room], params[:100], tags[:100]
            )
            metrics, params, tags = metrics[room:], params[100:], tags[100:]

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.run_id is not None:
            self.connection.call("log_artifact", self.run_id, str(path), folder)

    def register_model(
        self,
        model: Any,
        example: Any,
        name: str,
        tags: dict[str, str],
        content: str,
        description: str = "",
    ) -> str | None:
        """Log `model` as an MLflow logged model of this run (the experiment's Models tab lists
        it; exported with `example`, a batch of inputs), and register it as a new version of
        `name` with `tags` and `description`, unless a version with the same `content` (the
        checkpoint's hash) exists: that one is kept. The alias `current` points at the version
        (MLflow reserves `latest`). Returns the version."""
        connection = self.connection
        if self.run_id is None or connection.error is not None:
            return None
        import mlflow.pytorch  # here only: importing it costs seconds

        tags = {**tags, CONTENT_TAG: content}
        logged = connection.call(
            "create_logged_model",
            connection.experiment_id,
            name="backbone",
            source_run_id=self.run_id,
            tags=tags,
        )
        if logged is None:
            return None
        with tempfile.TemporaryDirectory() as folder:
            saved = Path(folder) / "model"
            # the exact torch only: inferring the requirements would scan the environment
            requirements = [f"torch=={torch.__version__.split('+')[0]}"]
            try:
                mlflow.pytorch.save_model(
                    model, saved, input_example=example, pip_requirements=requirements
                )
            except Exception as err:  # a model MLflow cannot export is a tracking failure
                connection.call("finalize_logged_model", logged.model_id, "FAILED")
                connection.fail(err)
                return None
            connection.call("log_model_artifacts", logged.model_id, str(saved))
        # the run's page lists it among its outputs, as MLflow's own log_model does
        connection.call("log_outputs", self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        connection.call("finalize_logged_model", logged.model_id, "READY")
        version = self._version_with(name, content)
        if version is None:
            if not connection.call("search_registered_models", filter_string=f"name = '{name}'"):
                connection.call("create_registered_model", name, exists_ok=True)
            created = connection.call(
                "create_model_version",
                name,
                f"models:/{logged.model_id}",
                run_id=self.run_id,
                tags=tags,
                description=description,
                model_id=logged.model_id,
            )
            version = created.version if created is not None else None
        if version is not None:
            connection.call("set_registered_model_alias", name, MODEL_ALIAS, version)
        return version

    def _version_with(self, name: str, content: str) -> str | None:
        """The registered version of `name` whose content hash is `content`, if any."""
        versions = self.connection.call("search_model_versions", f"name = '{name}'") or []
        same = [v.version for v in versions if v.tags.get(CONTENT_TAG) == content]
        return min(same, key=int) if same else None

    def identity(self) -> str | None:
        return self.run_id

    def failure(self) -> str | None:
        return self.connection.error

    def handover(self) -> dict[str, Any]:
        if self.run_id is None or self.connection.error is not None:
            return {}  # a store that failed already gets no more records, as in this process
        return {
            "parent": self.run_id,
            "experiment": self.connection.experiment_id,
            "root": str(self.connection.root),
            "tags": self.connection.base_tags,  # lineage: commit, orchestrator, flow run id
        }

    def set_status(self, status: str) -> None:
        if self.run_id is None:
            return
        if status == "RUNNING":
            self.connection.call("update_run", self.run_id, status="RUNNING")
            self.connection.open[self.run_id] = "parent"
        else:
            self.connection.call("set_terminated", self.run_id, status=status)
            self.connection.open.pop(self.run_id, None)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            if self.started_ms is not None:  # under `dvc repro`, each stage's end updates it
                self.log(metrics={"wall_time_s": (_now_ms() - self.started_ms) / 1000})
            self.set_status("FINISHED")
            return
        # an error fails a run; a signal (KeyboardInterrupt, SystemExit, Prefect's own
        # termination signals: none of them an Exception) kills it
        status = "FAILED" if issubclass(exc_type, Exception) else "KILLED"
        self.set_status(status)
        if self.top_level:
            self.connection.end_open_runs(status)  # what other threads left open, too


def open_store() -> None:
    """Open the tracking store now (a new sqlite store creates its tables: 1 to 2 s); MLflow
    keeps it open for every client of the same URI. A store that fails is reported later, by
    the execution that needs it."""
    with contextlib.suppress(Exception):
        _ = MlflowClient(tracking_uri())._tracking_client.store


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating the experiment if it does not exist yet. It is marked as
    model training, so that MLflow's UI opens it on its runs table rather than on the empty
    pages of its GenAI mode (a kind someone set by hand is kept)."""
    found = client.get_experiment_by_name(name)
    if found:
        if EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as err:
        # On a shared server, another execution may have created it since we looked.
        if not _already_exists(err):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _already_exists(err: Exception) -> bool:
    return isinstance(err, MlflowException) and err.error_code == ErrorCode.Name(
        RESOURCE_ALREADY_EXISTS
    )


def _connect(experiment: str, orchestrator: str, execution: str | None, root: Path) -> Connection:
    uri = tracking_uri()
    check_tracking(uri)
    client = MlflowClient(uri)
    try:
        exp_id = _experiment_id(client, experiment)
    except Exception as err:  # the store answered, but not as a store should
        raise TrackingError(f"MLflow tracking store {uri}: {str(err).splitlines()[0]}") from err
    base_tags = {**git_state(root), "orchestrator": orchestrator}
    if orchestrator == "prefect" and execution:
        base_tags["prefect.flow_run_id"] = execution
    return Connection(client, exp_id, root, base_tags)


def start_pipeline_run(
    experiment: str,
    orchestrator: str,
    execution: str | None = None,
    root: Path = Path("."),
    label: str = "params.yaml",
) -> Run:
    """Create the parent run of one pipeline execution (after checking the store); `label`
    names what it ran: the params file and any overrides."""
    connection = _connect(experiment, orchestrator, execution, root)
    return _create_parent(connection, orchestrator, execution, label)


def _create_parent(
    connection: Connection, orchestrator: str, execution: str | None, label: str
) -> Run:
    """A parent named for what tells executions apart in the runs table, whose column shows
    about 20 characters: the time to the second (the date is in the Created column), what it
    ran (params file, overrides), then the orchestrator."""
    tags = {**connection.base_tags, EXECUTION_TAG: execution or f"{orchestrator}-{_now_ms()}"}
    tags[LEVEL] = "execution"
    name = f"{time.strftime('%H:%M:%S')} {label} {orchestrator}"
    run = connection.call("create_run", connection.experiment_id, run_name=name, tags=tags)
    if run is None:
        raise TrackingError(f"MLflow tracking store {tracking_uri()}: {connection.error}")
    connection.open[run.info.run_id] = name
    return Run(connection, run.info.run_id, top_level=True, started_ms=run.info.start_time)


# MLflow's UI opens in its GenAI mode unless told otherwise; this filter lists one row per
# execution (the runs table otherwise pages 100 runs, newest first, and a study of several
# hundred runs pushes older executions off the first page)
EXECUTIONS_FILTER = f"tags.{LEVEL} = 'execution'"


def runs_page(experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The address of the experiment's runs table in MLflow's UI, in its model-training mode,
    filtered to one row per execution (`base`: the UI's address, when the store is not a
    server)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    try:
        found = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception:  # a store that fails now costs the link its experiment, not the result
        found = None
    where = f"experiments/{found.experiment_id}/runs" if found else "experiments"
    query = urllib.parse.urlencode(
        {"workflowType": "machine_learning", "searchFilter": EXECUTIONS_FILTER},
        quote_via=urllib.parse.quote,
    )
    return f"{base}/#/{where}?{query}"


def _dvc_execution() -> str | None:
    """An id for the `dvc repro` / `dvc exp run` process that launched this stage, if any.

    DVC sets DVC_STAGE in each stage command's environment; the launching DVC process is the
    nearest ancestor without it (a shell may stand between the two).
    """
    if "DVC_STAGE" not in os.environ:
        return None
    for process in psutil.Process().parents():
        try:
            if "DVC_STAGE" not in process.environ():
                return f"dvc-{socket.gethostname()}-{process.pid}-{process.create_time():.0f}"
        except psutil.Error:
            continue
    return None


def join_stage_parent(experiment: str, label: str) -> Run:
    """The parent run a stage's command line joins (see the module docstring); marked RUNNING."""
    execution = _dvc_execution()
    if execution is None:
        return start_pipeline_run(experiment, "cli", label=label)
    connection = _connect(experiment, "dvc", execution, Path("."))
    found = connection.call(
        "search_runs",
        [connection.experiment_id],
        filter_string=f"tags.`{EXECUTION_TAG}` = '{execution}'",
        max_results=1,
    )
    if not found:
        return _create_parent(connection, "dvc", execution, label)
    parent = Run(
        connection, found[0].info.run_id, top_level=True, started_ms=found[0].info.start_time
    )
    parent.set_status("RUNNING")
    return parent


def adopt(handover: dict[str, Any]) -> Recorder:
    """Record under a run that another process opened and will end (its `handover()`): the
    torchrun ranks record under their launcher's parent. Records nothing when it had none."""
    if not handover:
        return Recorder()
    uri = tracking_uri()
    check_tracking(uri)
    connection = Connection(
        MlflowClient(uri), handover["experiment"], Path(handover["root"]), handover["tags"]
    )
    return Run(connection, handover["parent"])
