"""What a stage records, without knowing where it goes: the narrow interface between the stages
and tracking.

A stage is `stage(params, layout, recorder) -> metrics`. It opens a nested record for each unit
of work (`child`), and logs params, metrics, per-epoch curves, finished runs whose start and end
it knows (`finished`), artifacts and a model to register. The execution frame (tasks/frame.py)
hands the stages an MLflow-backed recorder (tasks/recording/tracking.py); a caller that wants
no tracking passes this base class, which records nothing, and tests pass `MemoryRecorder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEVEL = "level"  # the tag on every record: execution, stage, budget or seed (a filter in the UI)


def stage_tags(stage: str, **more: str) -> dict[str, str]:
    """The tags of a stage's record."""
    return {"stage": stage, LEVEL: "stage", **more}


class Recorder:
    """Records nothing: the stages' work without tracking (and the interface's definition)."""

    def child(
        self, name: str, tags: dict[str, str] | None = None, inputs: Sequence[Path] = ()
    ) -> Recorder:
        """A record nested under this one, open until its `with` block ends; `inputs` are the
        files it reads (tracked by their DVC hashes)."""
        return Recorder()

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
    ) -> Recorder:
        """A nested record of work already done between `started` and `ended` (seconds since
        the epoch), with its per-epoch `history` stamped at `epoch_ends`. Returned so that more
        can be logged to it later (a gain once its baseline is known)."""
        return Recorder()

    def log(
        self,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """Params, metrics (at one step) and tags."""

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """A file, kept beside the record (under `folder`)."""

    def register_model(
        self,
        model: Any,
        example: Any,
        name: str,
        tags: dict[str, str],
        content: str,
        description: str = "",
    ) -> str | None:
        """Log `model` (inputs like `example`) and register it as a version of `name`, a new
        one only when no version has the same `content` hash; the version."""
        return None

    def identity(self) -> str | None:
        """This record's id in its store (an MLflow run id), if it has one."""
        return None

    def failure(self) -> str | None:
        """The tracking error after which records were skipped, if any (results never are)."""
        return None

    def handover(self) -> dict[str, Any]:
        """What another process needs to record under this record (`tracking.adopt`)."""
        return {}

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class MemoryRecorder(Recorder):
    """Keeps every record in memory, as a tree: for tests and notebooks."""

    name: str = "root"
    tags: dict[str, str] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, str, float]] = field(default_factory=list)  # (step, key, value)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    times: tuple[float, float] | None = None  # (started, ended) of a `finished` record
    children: list[MemoryRecorder] = field(default_factory=list)
    status: str = "RUNNING"

    def identity(self) -> str | None:
        return f"memory:{self.name}"

    def child(
        self, name: str, tags: dict[str, str] | None = None, inputs: Sequence[Path] = ()
    ) -> MemoryRecorder:
        record = MemoryRecorder(name, dict(tags or {}), list(inputs))
        self.children.append(record)
        return record

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
    ) -> MemoryRecorder:
        record = self.child(name, tags, inputs)
        record.log(params, metrics)
        record.history += [
            (epoch, k, float(v)) for epoch, values in enumerate(history) for k, v in values.items()
        ]
        record.times, record.status = (started, ended), "FINISHED"
        return record

    def log(
        self,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        self.params |= params or {}
        self.metrics |= metrics or {}
        self.tags |= tags or {}
        self.history += [(step, k, float(v)) for k, v in (metrics or {}).items()]

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.artifacts.append((path, folder))

    def register_model(
        self,
        model: Any,
        example: Any,
        name: str,
        tags: dict[str, str],
        content: str,
        description: str = "",
    ) -> str | None:
        self.models.append(name)
        return str(len(self.models))

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None:
            self.status = "FINISHED"
        else:
            self.status = "FAILED" if issubclass(exc_type, Exception) else "KILLED"

    def find(self, **tags: str) -> list[MemoryRecorder]:
        """Every record below this one whose tags include `tags`."""
        found = []
        for record in self.children:
            if tags.items() <= record.tags.items():
                found.append(record)
            found += record.find(**tags)
        return found
