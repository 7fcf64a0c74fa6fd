"""dvc.yaml and the stage contracts in code have not drifted apart."""

from __future__ import annotations

import ast
import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.repo import Repo
from pydantic import BaseModel

from tasks.config.params import Params, load_params
from tasks.recording.recorder import Recorder as NoRecorder
from tasks.workspace.layout import Layout
from tests.helpers import REPO, make_workspace

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
STAGES = ["synthesizer", "synthesize", "prepare", "pretrain", "extract", "finetune", "compare"]
PER_TARGET = {"extract", "finetune"}
PER_SOURCE = {"pretrain"}
PER_CORPUS = {"synthesizer", "synthesize"}
SPEECH_TINY = REPO / "tests" / "params.speech.tiny.yaml"
HAS_SYNTHESIZERS = all(shutil.which(program) for program in ("espeak-ng", "flite"))
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
    pipeline = importlib.import_module("flows.study")  # the flow's stage tasks
    for stage in STAGES:
        assert body(stage)["cmd"].startswith(f"python -m tasks.{stage}")
        module = importlib.import_module(f"tasks.{stage}")
        assert callable(getattr(module, stage)) and callable(module.main)
        assert f"tasks/{stage}.py" in body(stage)["deps"]
        if stage == "finetune":  # the flow runs its groups; the same functions drive both
            assert pipeline.train_group_task.fn is module.train_group
        else:
            assert getattr(pipeline, f"{stage}_task").fn is getattr(module, stage)


def test_outputs_are_the_layout_paths() -> None:
    layout = Layout(Path("."))

    def rel(path: Path) -> str:
        return path.as_posix()

    assert body("synthesizer")["outs"] == [rel(layout.synthesizer_version(KEY))]
    assert body("synthesize")["outs"] == [
        rel(layout.synthesized(KEY)),
        rel(layout.synthesis_manifest(KEY)),
    ]
    assert body("prepare")["outs"] == [rel(layout.prepared("any").parent)]
    assert body("pretrain")["outs"] == [
        rel(layout.checkpoint(KEY)),
        rel(layout.pretrain_seconds(KEY)),
    ]
    assert body("pretrain")["metrics"] == [rel(layout.checkpoint_meta(KEY))]
    assert body("extract")["outs"] == [
        rel(layout.features(KEY, "any").parent),
        rel(layout.scores(KEY)),
    ]
    assert body("finetune")["outs"] == [
        rel(layout.results(KEY)),
        rel(layout.curves(KEY)),
        rel(layout.finetune_seconds(KEY)),
    ]
    reports = rel(layout.reports)
    written = (
        *("comparison.csv", "comparison.md", "summary.csv", "verdicts.csv", "sources.csv"),
        *("transferability.csv", "compute.csv", "report.md"),
    )
    assert body("compare")["outs"] == [
        *(f"{reports}/{name}" for name in (*written, "report.html")),
        f"{reports}/plots",
    ]
    assert body("compare")["metrics"] == [f"{reports}/metrics.json"]


def test_inputs_are_the_upstream_outputs() -> None:
    layout = Layout(Path("."))
    assert rel_in(layout.synthesizer_version(KEY), body("synthesize")["deps"])
    assert rel_in(layout.corpora, body("prepare")["deps"])
    # only the version probe runs every time; what it writes reruns the synthesis
    assert [s for s in STAGES if body(s).get("always_changed")] == ["synthesizer"]
    assert rel_in(layout.prepared(KEY), body("pretrain")["deps"])
    every_checkpoint = layout.checkpoint("any").parent.parent
    for stage in ("extract", "finetune"):
        assert rel_in(every_checkpoint, body(stage)["deps"])
    # measured seconds reach the compute table only: no other stage depends on them
    timings = layout.pretrain_seconds("any").parent.parent
    assert timings == layout.finetune_seconds("any").parent.parent
    assert [s for s in STAGES if rel_in(timings, body(s)["deps"])] == ["compare"]
    assert [s for s in STAGES if rel_in(layout.scores("any").parent, body(s)["deps"])] == [
        "compare"
    ]
    for stage in ("extract", "finetune"):
        assert rel_in(layout.prepared(KEY), body(stage)["deps"])
    assert rel_in(layout.features(KEY, "any").parent, body("finetune")["deps"])
    assert rel_in(layout.results(KEY).parent, body("compare")["deps"])
    assert rel_in(layout.features(KEY, "any").parent.parent, body("compare")["deps"])
    assert rel_in(layout.prepared(KEY).parent, body("compare")["deps"])


def rel_in(path: Path, deps: list[str]) -> bool:
    return path.as_posix() in deps


def test_dvc_resolves_one_extract_and_finetune_per_target(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    with Repo(str(REPO)) as repo:
        names = {stage.addressing for stage in repo.index.stages}
    per_target = {f"{s}@{t}" for s in PER_TARGET for t in params.targets}
    per_source = {f"pretrain@{source}" for source in params.sources}
    assert len(per_source) == 2  # the default study compares two sources
    assert names == {"prepare", "compare"} | per_target | per_source  # no corpus: no synthesis
    with Repo(str(make_workspace(tmp_path / "speech", SPEECH_TINY))) as repo:
        names = {stage.name for stage in repo.index.stages}
    corpora = load_params(SPEECH_TINY).synthesis
    assert {f"{s}@{c}" for s in PER_CORPUS for c in corpora} < names


def test_user_data_folder_is_a_prepare_dependency() -> None:
    assert "data/raw" in body("prepare")["deps"]
    assert (REPO / "data" / "raw").is_dir()


# --- code: every module a stage runs is a dependency --------------------------------------------

# Modules that do not change what a stage writes: where files go, the workspace lock, the
# records (MLflow), the execution frame, and contracts.py, which only
# decides whether a saved state is resumed. Empty __init__.py files (a docstring at most) are
# left out as well.
NOT_OUTPUT_RELEVANT = {
    "tasks/workspace/layout.py",
    "tasks/workspace/lock.py",
    "tasks/workspace/contracts.py",
    "tasks/frame.py",
}
NOT_OUTPUT_RELEVANT_FOLDERS = ("tasks/recording/",)


def output_relevant(path: Path) -> bool:
    name = path.as_posix()
    return name not in NOT_OUTPUT_RELEVANT and not name.startswith(NOT_OUTPUT_RELEVANT_FOLDERS)


def module_file(dotted: str) -> Path | None:
    """The file of module `dotted` under the repo (a package's __init__.py), if it is ours."""
    base = Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    return None


def is_empty(path: Path) -> bool:
    """No code: nothing, or a docstring alone."""
    statements = ast.parse((REPO / path).read_text()).body
    return not statements or (
        len(statements) == 1
        and isinstance(statements[0], ast.Expr)
        and isinstance(statements[0].value, ast.Constant)
    )


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the modules that `path` imports, anywhere in it: `import a.b`, `from a.b
    import c` (module c, or a name of a.b), relative imports, and the packages above each."""
    package = path.parent.parts  # what a relative import starts from
    found: set[str] = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if module_file(submodule) else module)
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    parents = {
        ".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 1)
    }
    return found | parents


def imported_task_modules(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """`path` and every tasks/ module it imports, transitively (read from the source, not run),
    except through the modules that do not change outputs."""
    seen = set() if seen is None else seen
    seen.add(path)
    for dotted in imported_modules(path):
        file = module_file(dotted)
        ours = file is not None and file.parts[0] == "tasks" and output_relevant(file)
        if ours and file not in seen:
            imported_task_modules(file, seen)
    return seen


def test_module_resolution_covers_every_import_form() -> None:
    """The forms the stages use: `from tasks.workspace import files` names a module, `from
    tasks.data.datasets import X` a name in one; both reach the module's file."""
    found = imported_task_modules(Path("tasks/extract.py"))
    assert {
        Path("tasks/workspace/files.py"),
        Path("tasks/learning/runtime.py"),
        Path("tasks/data/datasets.py"),
        Path("tasks/config/params.py"),
    } <= found
    assert Path("tasks/learning/__init__.py") in found  # packages run their __init__ first
    assert module_file("tasks.workspace") == Path("tasks/workspace/__init__.py")


@pytest.mark.parametrize("stage", STAGES)
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    needed = {
        p.as_posix() for p in imported_task_modules(Path(f"tasks/{stage}.py")) if not is_empty(p)
    }
    declared = {d for d in body(stage)["deps"] if d.startswith("tasks/")}
    assert needed == declared


# --- params: every key a stage reads is declared, and only those --------------------------------

# Keys that only name records (MLflow experiment and model) or steer Prefect: no output depends
# on them, so no stage declares them, even where a stage reads them.
NOT_OUTPUT_PARAMS = ("experiment", "registered_model", "flow")


def schema_has(key: str) -> bool:
    """Whether dotted `key` names a field of Params, walking nested models (a mapping of
    models, such as targets, is one value: its keys are names, not schema)."""
    model: Any = Params
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def covers(declared: str, read: str) -> bool:
    """A declared key covers the reads of itself and of everything below it."""
    return read == declared or read.startswith(f"{declared}.")


def declared_params(stage: str) -> list[str]:
    """A stage's params keys; a per-source stage's `sources.${key}` (its own entry of the
    mapping, which a stand-in records as a read of `sources`) counts as `sources`, and a
    per-corpus stage's `synthesis.${key}` as `synthesis`."""
    return [key.replace(f".{KEY}", "") for key in body(stage).get("params", [])]


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_are_keys_of_the_schema(stage: str) -> None:
    keys = declared_params(stage)
    assert keys and len(set(keys)) == len(keys), keys
    for key in keys:
        assert schema_has(key), f"{stage}: {key} is not a params key"
        assert not any(covers(top, key) for top in NOT_OUTPUT_PARAMS), key
        assert not any(covers(other, key) for other in keys if other != key), f"{key} twice"


def test_schema_walk_tells_keys_from_non_keys() -> None:
    assert all(
        map(
            schema_has,
            [
                "runtime",
                "runtime.threads",
                "pretrain.lr",
                "targets",
                "sources",
                "finetune.probe_l2",
            ],
        )
    )
    assert not any(
        map(
            schema_has,
            [
                "runtime.thread",
                "pretrain.lr.x",
                "nothing",
                "targets.shifted",
                "sources.digits.generator",
            ],
        )
    )


class Reads:
    """The dotted params keys read through `Tracked` stand-ins."""

    # Reads made while computing a resume fingerprint are left out: that reads the declared
    # keys by construction (tasks/workspace/contracts.py), and is checked against dvc.yaml in
    # tests/test_stage_contracts.py.
    IGNORED_MODULES = ("tasks.workspace.contracts",)

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, key: str) -> None:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_globals.get("__name__") in self.IGNORED_MODULES:
                return
            frame = frame.f_back
        self.keys.add(key)


class Tracked:
    """Stands in for a params model and records every dotted key read through it. A nested
    model comes back as another stand-in; a value (number, list, mapping) is recorded and
    returned as it is. Anything else done with a model (model_dump, iteration, a property,
    comparison, printing) may use any of its fields, so it records all of them."""

    __slots__ = ("_model", "_path", "_reads")

    def __init__(self, model: BaseModel, path: str, reads: Reads) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    @property  # isinstance(stand_in, Params) holds, as the stages' type checks expect
    def __class__(self) -> type:  # type: ignore[override]
        return type(self._model)

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _read_all(self) -> None:
        for key in leaf_keys(self._model, self._path):
            self._reads.add(key)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if name == "origin":  # which file the params came from: names the run, not a value
            return value
        if name not in type(self._model).model_fields:
            self._read_all()
            return value
        if isinstance(value, BaseModel):
            return Tracked(value, self._key(name), self._reads)
        self._reads.add(self._key(name))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"params are frozen: {self._key(name)}")

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        self._read_all()
        return iter(self._model)

    def __eq__(self, other: object) -> bool:
        self._read_all()
        return self._model == (other._model if isinstance(other, Tracked) else other)

    def __hash__(self) -> int:
        self._read_all()
        return hash(self._model)

    def __repr__(self) -> str:
        self._read_all()
        return repr(self._model)


def leaf_keys(model: BaseModel, path: str) -> Iterator[str]:
    """The dotted keys of every value in `model`, nested models walked."""
    for name in type(model).model_fields:
        key = f"{path}.{name}" if path else name
        value = getattr(model, name)
        yield from leaf_keys(value, key) if isinstance(value, BaseModel) else [key]


@pytest.fixture(scope="module")
def reads(tiny_params: Params, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The params keys each stage reads, run in order on the tiny params (every strategy,
    several targets), and again on the tiny text and image studies' (their branches: tokenizer,
    encoder, image size, augmentation), each stage with its own recording stand-in."""
    studies = [tiny_params, load_params(REPO / "tests" / "params.text.tiny.yaml")]
    if Path("/usr/share/datasets/fashion-mnist").is_dir():  # Debian's; .ci/run installs it
        studies.append(load_params(REPO / "tests" / "params.images.tiny.yaml"))
    if HAS_SYNTHESIZERS:  # Debian's espeak-ng and flite; .ci/run installs them
        studies.append(load_params(SPEECH_TINY))
    found: dict[str, set[str]] = {stage: set() for stage in STAGES}
    for study in studies:
        layout = Layout(tmp_path_factory.mktemp("workspace"))
        for stage in STAGES:
            function = getattr(importlib.import_module(f"tasks.{stage}"), stage)
            recorded = Reads()
            params = Tracked(study, "", recorded)
            per = {
                **dict.fromkeys(PER_TARGET, study.targets),
                **dict.fromkeys(PER_SOURCE, study.sources),
            }
            per |= dict.fromkeys(PER_CORPUS, study.synthesis)
            for name in per.get(stage, [None]):
                function(params, *([name] if name else []), layout, NoRecorder())
            found[stage] |= recorded.keys
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_every_params_key_a_stage_reads_is_declared(stage: str, reads) -> None:
    """Checked by running the stage, not by reading its source: params travel as sections
    (`cfg = params.finetune`, `runtime.configure(params.runtime)`, `fit(..., cfg)`) through
    helpers under any name, and sections are dumped whole (the checkpoint stores the model
    section); a stand-in that records each read sees all of it. A key the tiny run does not
    reach (a branch its params do not take) is not seen, which the next test bounds: every
    declared key must be read."""
    declared = declared_params(stage)
    read = {key for key in reads[stage] if not any(covers(t, key) for t in NOT_OUTPUT_PARAMS)}
    undeclared = sorted(key for key in read if not any(covers(d, key) for d in declared))
    assert not undeclared, f"{stage} reads params it does not declare in dvc.yaml: {undeclared}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_declared_params_key_is_read(stage: str, reads) -> None:
    """A declared key that the stage does not read reruns it for nothing (runtime.compile
    used to rerun every extract and finetune stage)."""
    unread = [
        key
        for key in declared_params(stage)
        if not any(covers(key, read) or covers(read, key) for read in reads[stage])
    ]
    assert not unread, f"{stage} declares params it does not read: {unread}"


SHIPPED_PARAMS = [
    "params.yaml",
    "params.quick.yaml",
    "params.sources.yaml",
    "params.text.yaml",
    "params.text.minilm.yaml",
    "tests/params.tiny.yaml",
    "tests/params.text.tiny.yaml",
    "params.images.yaml",
    "tests/params.images.tiny.yaml",
    "params.speech.yaml",
    "tests/params.speech.tiny.yaml",
]


@pytest.mark.parametrize("file", SHIPPED_PARAMS)
def test_every_declared_params_key_is_in_each_shipped_params_file(file: str) -> None:
    """`dvc repro` (and `dvc exp run` of a copied profile) refuses to run a stage whose declared
    params key is missing from params.yaml, even where the schema has a default for it."""
    document = yaml.safe_load((REPO / file).read_text())
    for stage in STAGES:
        for key in declared_params(stage):
            node: Any = document
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{file}: {stage} needs {key}"
                node = node[part]
