"""tasks/workspace/contracts.py: the deps dvc.yaml declares, and the resume fingerprint over
exactly those (a change DVC ignores does not discard a saved state; one it sees does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from tasks.config.params import Params
from tasks.workspace import contracts
from tests.helpers import REPO


def changed(params: Params, key: str, value: Any) -> Params:
    """`params` with dotted `key` set to `value`, validated again."""
    doc = params.model_dump()
    *parents, leaf = key.split(".")
    node = doc
    for part in parents:
        node = node[part]
    node[leaf] = value
    return Params.model_validate(doc)


def test_stage_deps_are_what_dvc_resolves() -> None:
    """The same entries DVC reads, `${key}` resolved the same way, code deps made absolute."""
    with Repo(str(REPO)) as repo:
        stages = list(repo.index.stages)
    assert stages
    for stage in stages:
        name, _, target = stage.addressing.partition("@")
        deps = contracts.stage_deps(name, target or None)
        paths = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
        params = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
        assert [p.relative_to(REPO).as_posix() for p in deps.code] == [
            p for p in paths if p.startswith("tasks/")
        ]
        assert all(p.is_absolute() and p.is_file() for p in deps.code)
        assert list(deps.data) == [p for p in paths if not p.startswith("tasks/")]
        assert list(deps.params) == params
        assert target in " ".join(deps.data)  # per target: its own inputs


def test_an_unknown_stage_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'nonesuch'"):
        contracts.stage_deps("nonesuch")
    with pytest.raises(ValueError, match="'nonesuch'"):
        contracts.fingerprint("nonesuch", None, Path("."))  # type: ignore[arg-type]


def test_a_per_target_stage_needs_its_target() -> None:
    with pytest.raises(ValueError, match=r"'finetune'.*target"):
        contracts.stage_deps("finetune")


def test_dvc_yaml_is_parsed_once() -> None:
    contracts.stage_deps("compare")
    before = contracts._stages.cache_info()
    for target in ("parsed_once_a", "parsed_once_b"):  # new to the per-stage cache too
        assert contracts.stage_deps("finetune", target).data[0] == f"data/prepared/{target}"
    after = contracts._stages.cache_info()
    assert after.misses == before.misses and after.hits > before.hits


def workspace_with_inputs(root: Path, stage: str, target: str | None = None) -> Path:
    """A workspace holding every data dep of `stage` (a file each; folders hold one)."""
    for dep in contracts.stage_deps(stage, target).data:
        path = root / dep
        if Path(dep).suffix:  # a file, such as the checkpoint
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(dep.encode())
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "train.npz").write_bytes(dep.encode())
    return root


@pytest.mark.parametrize(
    ("stage", "target", "key", "value", "moves"),
    [
        ("finetune", "shifted", "finetune.lrs", [0.01], True),
        ("finetune", "shifted", "runtime.threads", 1, True),
        ("finetune", "shifted", "runtime.compile", True, False),  # only pretraining compiles
        ("finetune", "shifted", "flow.workers", 7, False),  # Prefect only
        ("finetune", "shifted", "experiment", "elsewhere", False),  # MLflow only
        ("finetune", "shifted", "pretrain.lr", 0.5, False),  # reaches it through the checkpoint
        ("pretrain", "digits", "runtime.compile", True, True),
        ("pretrain", "digits", "model.hidden", [7], True),
        ("pretrain", "digits", "finetune.lrs", [0.01], False),
        ("pretrain", "digits", "sources.digits.generator.seed", 9, True),  # its own entry
        ("pretrain", "digits", "sources.views.generator.seed", 9, False),  # another's
        ("extract", "shifted", "finetune.seeds", [5], True),  # the scores' label subsets
        ("extract", "shifted", "extract.batch_size", 3, True),
        ("prepare", None, "targets.shifted.generator.seed", 9, True),  # a whole section
    ],
)
def test_fingerprint_follows_the_declared_params_only(
    tiny_params: Params, tmp_path: Path, stage: str, target: str | None, key: str, value: Any,
    moves: bool,
) -> None:  # fmt: skip
    root = workspace_with_inputs(tmp_path, stage, target)
    before = contracts.fingerprint(stage, tiny_params, root, target)
    after = contracts.fingerprint(stage, changed(tiny_params, key, value), root, target)
    assert (before != after) == moves
    assert before == contracts.fingerprint(stage, tiny_params, root, target)  # deterministic


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dvc.yaml of one stage beside its own code: tasks/step.py, reading data/in."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "step.py").write_text("STEP = 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  step:\n    cmd: python -m tasks.step\n"
        "    deps: [data/in, tasks/step.py]\n    params: [pretrain.lr]\n"
    )
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "a.npz").write_bytes(b"a")
    monkeypatch.setattr(contracts, "DVC_YAML", tmp_path / "dvc.yaml")
    return tmp_path


def test_fingerprint_follows_the_code_deps_bytes(toy: Path, tiny_params: Params) -> None:
    assert contracts.stage_deps("step").code == (toy / "tasks" / "step.py",)
    before = contracts.fingerprint("step", tiny_params, toy)
    (toy / "tasks" / "step.py").write_text("STEP = 2\n")
    assert contracts.fingerprint("step", tiny_params, toy) != before


def test_fingerprint_follows_the_data_but_not_run_state(toy: Path, tiny_params: Params) -> None:
    def fingerprint(**kwargs: Any) -> str:
        return contracts.fingerprint("step", tiny_params, toy, **kwargs)

    folder = toy / "data" / "in"
    before = fingerprint()
    for name in (".hidden", "cells.progress.json", "state.resume.pt", ".a.npz.x1.tmp", "b.tmp"):
        (folder / name).write_bytes(b"run state")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "c.npz").write_bytes(b"c")
    assert fingerprint() == before
    (folder / "sub").mkdir()
    (folder / "sub" / "b.npz").write_bytes(b"b")
    added = fingerprint()
    assert added != before
    assert fingerprint(exclude=lambda path: path.parent.name == "sub") == before
    (folder / "sub" / "b.npz").rename(folder / "sub" / "c.npz")  # same bytes, another name
    assert fingerprint() != added
    (folder / "a.npz").write_bytes(b"A")
    assert fingerprint(exclude=lambda path: path.parent.name == "sub") != before


def test_fingerprint_needs_the_data(toy: Path, tiny_params: Params) -> None:
    (toy / "data" / "in" / "a.npz").unlink()
    (toy / "data" / "in").rmdir()
    with pytest.raises(FileNotFoundError):
        contracts.fingerprint("step", tiny_params, toy)
