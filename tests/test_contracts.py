"""dvc.yaml and the stage contracts in code have not drifted apart."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from flows import pipeline
from tasks.config.params import Params, load_params
from tasks.workspace.layout import Layout
from tests.helpers import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
STAGES = ["prepare", "pretrain", "extract", "finetune", "compare"]
KEY = "${key}"


def body(stage: str) -> dict:
    """A stage's definition, with output entries reduced to their paths."""
    definition = dict(DVC[stage].get("do", DVC[stage]))
    for kind in ("outs", "metrics", "plots"):
        if kind in definition:
            definition[kind] = [
                e if isinstance(e, str) else next(iter(e)) for e in definition[kind]
            ]
    return definition


def test_every_output_persists_while_its_stage_runs() -> None:
    """DVC deletes non-persistent outputs before running a stage, so a stage that then refuses
    bad params would lose the previous results."""
    for stage in STAGES:
        definition = DVC[stage].get("do", DVC[stage])
        for kind in ("outs", "metrics", "plots"):
            for entry in definition.get(kind, []):
                assert isinstance(entry, dict) and next(iter(entry.values()))["persist"], entry


def test_stage_name_is_module_is_function_and_the_flow_runs_the_same_function() -> None:
    assert list(DVC) == STAGES
    for stage in STAGES:
        assert body(stage)["cmd"].startswith(f"python -m tasks.{stage}")
        module = importlib.import_module(f"tasks.{stage}")
        assert callable(getattr(module, stage)) and callable(module.main)
        assert f"tasks/{stage}.py" in body(stage)["deps"] or stage == "compare"
        if stage == "finetune":  # the flow runs its groups; the same functions drive both
            assert pipeline.train_group_task.fn is module.train_group
        else:
            assert getattr(pipeline, f"{stage}_task").fn is getattr(module, stage)
    assert "tasks/compare.py" in body("compare")["deps"]


def test_outputs_are_the_layout_paths() -> None:
    layout = Layout(Path("."))

    def rel(path: Path) -> str:
        return path.as_posix()

    assert body("prepare")["outs"] == [rel(layout.prepared("source").parent)]
    assert body("pretrain")["outs"] == [rel(layout.checkpoint)]
    assert body("pretrain")["metrics"] == [rel(layout.checkpoint_meta)]
    assert body("extract")["outs"] == [rel(layout.features(KEY))]
    assert body("finetune")["outs"] == [rel(layout.results(KEY))]
    reports = rel(layout.reports)
    assert body("compare")["outs"] == [
        f"{reports}/{name}"
        for name in ("comparison.csv", "comparison.md", "summary.csv", "verdicts.csv", "report.md")
    ]
    assert body("compare")["metrics"] == [f"{reports}/metrics.json"]
    assert body("compare")["plots"] == [f"{reports}/plots"]


def test_inputs_are_the_upstream_outputs() -> None:
    layout = Layout(Path("."))
    assert rel_in(layout.prepared("source"), body("pretrain")["deps"])
    for stage in ("extract", "finetune"):
        assert rel_in(layout.prepared(KEY), body(stage)["deps"])
        assert rel_in(layout.checkpoint, body(stage)["deps"])
    assert rel_in(layout.features(KEY), body("finetune")["deps"])
    assert rel_in(layout.results(KEY).parent, body("compare")["deps"])
    assert rel_in(layout.features(KEY).parent, body("compare")["deps"])
    assert rel_in(layout.prepared(KEY).parent, body("compare")["deps"])


def rel_in(path: Path, deps: list[str]) -> bool:
    return path.as_posix() in deps


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_are_sections_of_the_schema(stage: str) -> None:
    for key in body(stage).get("params", []):
        assert key.split(".")[0] in Params.model_fields, key


def test_dvc_resolves_one_extract_and_finetune_per_target() -> None:
    params = load_params(REPO / "params.yaml")
    with Repo(str(REPO)) as repo:
        names = {stage.addressing for stage in repo.index.stages}
    per_target = {f"{s}@{t}" for s in ("extract", "finetune") for t in params.targets}
    assert names == {"prepare", "pretrain", "compare"} | per_target


# Modules that do not change what a stage writes: where files go, MLflow records, the CLI frame.
NOT_OUTPUT_RELEVANT = {"tasks/workspace/layout.py", "tasks/recording/tracking.py", "tasks/cli.py", "tasks/recording/lineage.py",
                       "tasks/workspace/lock.py"}  # fmt: skip


def imported_task_modules(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """`path` and every tasks/*.py it imports, transitively (read from the source, not run),
    except through the modules that do not change outputs."""
    seen = set() if seen is None else seen
    seen.add(path)
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "tasks":
            names = [f"tasks/{alias.name}.py" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks."):
            names = [node.module.replace(".", "/") + ".py"]
        for name in map(Path, names):
            relevant = name.as_posix() not in NOT_OUTPUT_RELEVANT
            if relevant and name not in seen and (REPO / name).is_file():
                imported_task_modules(name, seen)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    needed = {p.as_posix() for p in imported_task_modules(Path(f"tasks/{stage}.py"))}
    declared = {d for d in body(stage)["deps"] if d.startswith("tasks/")}
    assert needed == declared


def test_user_data_folder_is_a_prepare_dependency() -> None:
    assert "data/raw" in body("prepare")["deps"]
    assert (REPO / "data" / "raw").is_dir()
