"""What each stage's result depends on, read from dvc.yaml: the one list.

DVC uses a stage's deps and params in dvc.yaml to decide whether the stage is stale; the stages
use the same entries for their resume fingerprints (`fingerprint`), so a saved state is resumed
exactly when DVC would not rerun the stage for a change. tests/test_contracts.py checks the
lists against the code: every tasks/ module a stage imports, every params key it reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic_core import to_jsonable_python

from tasks.config.params import Params
from tasks.workspace import files

# The dvc.yaml beside the code: the code's own contract, whichever workspace it runs in.
DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"
CODE_PREFIX = "tasks/"
# Run state inside a dependency folder, not part of it: resume states, progress files, the
# temporary files of atomic writes (hidden files are skipped too).
_RUN_STATE_SUFFIXES = (".resume.pt", ".progress.json", ".tmp")


@dataclass(frozen=True)
class StageDeps:
    code: tuple[Path, ...]  # absolute paths of the tasks/ modules under the code's root
    data: tuple[str, ...]  # the other deps as declared, relative to the workspace root
    params: tuple[str, ...]  # dotted params keys: "pretrain.lr", or a whole section "source"


@functools.lru_cache(maxsize=4)
def _stages(dvc_yaml: Path) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages, parsed once per file (stages ask for them in every fingerprint)."""
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


@functools.lru_cache(maxsize=64)
def _stage_deps(dvc_yaml: Path, stage: str, target: str | None) -> StageDeps:
    stages = _stages(dvc_yaml)
    if stage not in stages:
        raise ValueError(f"stage {stage!r} is not in {dvc_yaml} (stages: {', '.join(stages)})")
    definition = stages[stage]
    if "foreach" in definition:  # one stage per target: `${key}` is the target's name
        if target is None:
            raise ValueError(f"stage {stage!r} runs per target in {dvc_yaml}; name the target")
        definition = definition["do"]

    def resolve(entry: str) -> str:
        return entry if target is None else entry.replace("${key}", target)

    deps = [resolve(d) for d in definition.get("deps", [])]
    return StageDeps(
        code=tuple(dvc_yaml.parent / d for d in deps if d.startswith(CODE_PREFIX)),
        data=tuple(d for d in deps if not d.startswith(CODE_PREFIX)),
        params=tuple(resolve(p) for p in definition.get("params", [])),
    )


def stage_deps(stage: str, target: str | None = None) -> StageDeps:
    """The deps and params that dvc.yaml declares for `stage` (for `target`, if it runs per
    target). Raises ValueError for a stage that is not there."""
    return _stage_deps(DVC_YAML, stage, target)


def param_value(params: Params, key: str) -> Any:
    """The JSON value of a dotted params key; a section (or a mapping of them) as a whole."""
    value: Any = params
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    # duck-typed rather than isinstance: tests hand in a stand-in that records the reads
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return to_jsonable_python(value)


def _data_files(root: Path, dep: str, exclude: Callable[[Path], bool] | None) -> Iterator[Path]:
    """The files of one data dep: the file itself, or a folder's files in sorted order."""
    path = root / dep
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in found:
        hidden = any(part.startswith(".") for part in file.relative_to(root).parts)
        if hidden or file.name.endswith(_RUN_STATE_SUFFIXES):
            continue
        if exclude is None or not exclude(file):
            yield file


def fingerprint(
    stage: str,
    params: Params,
    root: Path,
    target: str | None = None,
    exclude: Callable[[Path], bool] | None = None,
) -> str:
    """sha256 of what dvc.yaml says `stage` depends on: the declared params' values, the torch
    version, the code deps' bytes and the data deps' bytes under workspace `root`. `exclude`
    skips data files (e.g. the stage's own outputs inside a dep folder).

    A missing data file raises FileNotFoundError: the stage cannot run without it anyway.
    """
    deps = stage_deps(stage, target)
    data = [file for dep in deps.data for file in _data_files(root, dep, exclude)]
    config = {
        "params": {key: param_value(params, key) for key in deps.params},
        "torch": torch.__version__,
        # names too, so that a renamed or moved file changes the fingerprint
        "data": [file.relative_to(root).as_posix() for file in data],
        "code": [path.relative_to(DVC_YAML.parent).as_posix() for path in deps.code],
    }
    return files.fingerprint(config, [*deps.code, *data])
