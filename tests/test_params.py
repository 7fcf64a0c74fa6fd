"""params.yaml is validated before any work, with one line naming the key and the file."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config.params import ParamsError, load_params
from tasks.finetune import STRATEGIES
from tests.helpers import REPO, TINY


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def mutated(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(TINY.read_text())
    edit(doc)
    return write(tmp_path, yaml.safe_dump(doc))


TEXT_TINY = REPO / "tests" / "params.text.tiny.yaml"


def test_shipped_params_files_are_valid() -> None:
    default = load_params(REPO / "params.yaml")
    tiny = load_params(TINY)
    assert set(default.targets) >= {"new_classes", "shifted"}
    assert len(default.finetune.fractions) >= 2 and len(default.finetune.seeds) >= 2
    assert len(default.finetune.strategies) >= 4 and len(default.finetune.seeds) >= 3
    assert len(default.finetune.fractions) >= 3
    assert len(default.sources) >= 2  # the source x target matrix: the choice matters
    assert all(s.generator.num_samples >= 10000 for s in default.sources.values())
    bigger = load_params(REPO / "params.sources.yaml")  # the bigger study: every strategy
    assert set(bigger.finetune.strategies) == set(STRATEGIES)
    assert {s.kind for s in bigger.sources.values()} == {"mnist1d", "joint"}
    assert "contrastive" in {s.objective for s in bigger.sources.values()}
    # the same schema at both sizes: every section and finetune knob is set explicitly in each
    # (and every key a stage declares in dvc.yaml is there, or `dvc repro` refuses to run)
    sections = set(type(default).model_fields)
    assert default.model_fields_set == tiny.model_fields_set == sections
    assert default.finetune.model_fields_set == tiny.finetune.model_fields_set
    text, text_tiny = (load_params(p) for p in (REPO / "params.text.yaml", TEXT_TINY))
    assert text.model_fields_set == text_tiny.model_fields_set == sections
    assert text.finetune.model_fields_set == text_tiny.finetune.model_fields_set
    assert set(text.finetune.strategies) == set(STRATEGIES)
    text_kinds = {s.kind for s in text.sources.values()} | {t.kind for t in text.targets.values()}
    assert text_kinds == {"fortunes"}


def test_params_are_frozen(tiny_params) -> None:
    with pytest.raises(ValueError):
        tiny_params.pretrain.lr = 1.0


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["finetune"].update(sedds=[0]), "finetune.sedds: unknown key"),
        (
            lambda d: d["targets"]["shifted"]["generator"].update(noise=1),
            "targets.shifted.generator.noise: unknown key",
        ),
        (lambda d: d.update(extra=1), "extra: unknown key"),
        (
            lambda d: d["pretrain"].update(max_epochs="many"),
            "pretrain.max_epochs: Input should be a valid integer",
        ),
        (
            lambda d: d["pretrain"].update(max_epochs=0),
            "pretrain.max_epochs: Input should be greater than 0",
        ),
        (
            lambda d: d["finetune"].update(batch_size=-4),
            "finetune.batch_size: Input should be greater than 0",
        ),
        (
            lambda d: d["finetune"].update(fractions=[0.5, 1.5]),
            "finetune.fractions.1: Input should be less than or equal to 1",
        ),
        (
            lambda d: d["finetune"].update(fractions=[0.0]),
            "finetune.fractions.0: Input should be greater than 0",
        ),
        (lambda d: d.update(targets={}), "targets: Value error, must name at least one dataset"),
        (
            lambda d: d["finetune"].update(strategies=["scratch", "magic"]),
            "finetune.strategies.1: Input should be 'scratch'",
        ),
        (
            lambda d: d["finetune"].update(strategies=["linear_probe"]),
            "finetune.strategies: Value error, must include 'scratch'",
        ),
        (
            lambda d: d["sources"]["digits"].update(kind="parquet"),
            "sources.digits.kind: Input should be 'mnist1d', 'npz', 'text', 'fortunes', 'images', "
            "'idx', 'audio' or 'joint'",
        ),
        (
            lambda d: d["model"].update(backbone="resnet"),
            "model.backbone: Input should be 'cnn1d', 'mlp', 'transformer', 'pretrained' or 'timm'",
        ),
        (
            lambda d: d["targets"]["shifted"].update(classes=[]),
            "targets.shifted.classes: Value error, must name at least one class",
        ),
        (lambda d: d.pop("sources"), "sources: required key is missing"),
        (
            lambda d: d["split"].update(val=0.5, test=0.5),
            "split: Value error, val + test must be below 1",
        ),
        (
            lambda d: d["finetune"].update(strategies=["scratch", "partial"], freeze_blocks=2),
            "finetune.freeze_blocks (2) must be below the number of backbone blocks (2)",
        ),
    ],
)
def test_bad_params_name_the_key_and_file(tmp_path: Path, edit, expected: str) -> None:
    path = mutated(tmp_path, edit)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {expected}")
    assert "\n" not in message


@pytest.mark.parametrize("name", ["-x", "a b", "ünï", "a.b"])
def test_unsafe_target_names_are_refused(tmp_path: Path, name: str) -> None:
    spec = {"kind": "mnist1d"}
    path = mutated(tmp_path, lambda d: d.update(targets={name: spec}))
    with pytest.raises(ParamsError, match=r"targets: Value error, name .* must start with"):
        load_params(path)


def test_na_like_target_names_are_fine(tmp_path: Path) -> None:
    path = mutated(tmp_path, lambda d: d.update(targets={"NA": {"kind": "mnist1d"}}))
    assert list(load_params(path).targets) == ["NA"]


@pytest.mark.parametrize("key", ["finetune.seeds=[0, -1]", "split.seed=-3", "pretrain.seed=-1"])
def test_negative_seeds_are_refused(key: str) -> None:
    with pytest.raises(ParamsError, match=r"Input should be greater than or equal to 0"):
        load_params(TINY, [key])


def test_missing_npz_file_is_named(tmp_path: Path) -> None:
    path = mutated(
        tmp_path, lambda d: d["targets"].update(mine={"kind": "npz", "path": "nope.npz"})
    )
    with pytest.raises(ParamsError, match=r"targets.mine.path: file 'nope.npz' does not exist"):
        load_params(path)


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "experiment: x\nsource:\n  kind: [mnist1d\n")
    with pytest.raises(ParamsError, match=r"YAML does not parse at line 4"):
        load_params(path)


def test_duplicate_target_names_are_refused(tmp_path: Path) -> None:
    text = TINY.read_text().replace("  shifted:\n", "  new_classes:\n")
    with pytest.raises(ParamsError, match=r"duplicate key 'new_classes'"):
        load_params(write(tmp_path, text))


def test_overrides_apply_and_are_validated() -> None:
    params = load_params(TINY, ["finetune.seeds=[3, 4, 5]", "pretrain.lr=0.01"])
    assert params.finetune.seeds == [3, 4, 5] and params.pretrain.lr == 0.01
    with pytest.raises(ParamsError, match=r"finetune.sedds: unknown key"):
        load_params(TINY, ["finetune.sedds=[1]"])
    with pytest.raises(ParamsError, match=r"expected KEY=VALUE"):
        load_params(TINY, ["finetune.seeds"])


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"params file not found"):
        load_params(tmp_path / "absent.yaml")


# --- property-based: any mutation of a valid document is accepted or refused cleanly ---------

TINY_DOC = yaml.safe_load(TINY.read_text())
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 12), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def paths(node, prefix=()):
    """Every key path in a nested document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))


@st.composite
def mutated_documents(draw):
    doc = copy.deepcopy(TINY_DOC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(paths(doc), key=str)))
        *parents, leaf = path
        node = doc
        for key in parents:
            node = node[key]
        action = draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete":
            del node[leaf]
        elif action == "replace":
            node[leaf] = draw(VALUES)
        elif isinstance(node[leaf], dict):
            node[leaf][draw(st.text(min_size=1, max_size=6))] = draw(VALUES)
        if not list(paths(doc)):
            break
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_any_mutated_document_is_accepted_or_refused_with_a_one_line_message(doc) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_params(path)
        except ParamsError as err:
            message = str(err)
            assert message.startswith(f"{path}: ") and "\n" not in message


@pytest.mark.parametrize("file", [TINY, TEXT_TINY])
def test_params_survive_a_dump_and_reload(file: Path) -> None:
    """What torchrun's ranks and the contract checks do: every key is then set explicitly,
    defaults included, and must not read as a key set for the wrong kind."""
    params = load_params(file)
    again = type(params).model_validate(params.model_dump(mode="json"))
    assert again.model_dump() == params.model_dump()


def test_the_deprecated_source_key_is_read_as_one_source(tmp_path: Path, caplog) -> None:
    doc = yaml.safe_load(TINY.read_text())
    doc["source"] = doc.pop("sources")["digits"]
    text = yaml.safe_dump(doc)
    # params.yaml: what dvc.yaml reads too, which cannot run it
    with pytest.raises(ParamsError, match=r"params.yaml: `source:` is deprecated.*sources:"):
        load_params(write(tmp_path, text))
    path = tmp_path / "old.yaml"  # another params file: read, with a warning
    path.write_text(text)
    params = load_params(path)
    assert list(params.sources) == ["source"]
    assert params.sources["source"].classes == [0, 1, 2, 3, 4]
    assert "`source:` is deprecated" in caplog.text and str(path) in caplog.text
    doc["sources"] = {"other": doc["source"]}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError, match="not both"):
        load_params(path)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["targets"].update(digits=d["targets"]["shifted"]), "names a source and"),
        (
            lambda d: d["sources"].update(both={"kind": "joint", "of": ["digits"]}),
            "two or more source names",
        ),
        (
            lambda d: d["sources"].update(both={"kind": "joint", "of": ["digits", "nope"]}),
            "sources.both.of: 'nope' is not a source to unite",
        ),
        (lambda d: d["sources"]["digits"].update(of=["views"]), "'of' is only for kind joint"),
        (
            lambda d: d["sources"].update(
                both={"kind": "joint", "of": ["digits", "views"], "path": "x.npz"}
            ),
            "'path' is not for kind joint",
        ),
        (lambda d: d["sources"]["views"].update(objective="mlm"), "mlm needs model.backbone"),
        (
            lambda d: d["pretrain"].update(processes=2),
            "sources.views.objective: contrastive runs in one process",
        ),
        (lambda d: d["targets"]["shifted"].update(objective="contrastive"), "unknown key"),
    ],
)
def test_bad_sources_are_refused_by_key(tmp_path: Path, edit, expected: str) -> None:
    with pytest.raises(ParamsError, match=expected):
        load_params(mutated(tmp_path, edit))


def test_a_joint_source_unites_its_members_classes_apart(tmp_path: Path) -> None:
    from tasks.config.params import SplitParams
    from tasks.data.sources import build_splits, unite

    params = load_params(
        mutated(
            tmp_path,
            lambda d: d["sources"].update(both={"kind": "joint", "of": ["digits", "views"]}),
        )
    )
    split = SplitParams()
    members = {
        name: build_splits(params.sources[name], split, f"sources.{name}", cut_test=False)
        for name in ("digits", "views")
    }
    joint = unite(members, "sources.both")
    assert joint.classes == [f"digits:{c}" for c in range(5)] + [f"views:{c}" for c in range(10)]
    train = joint.splits["train"]
    assert len(train) == sum(len(m.splits["train"]) for m in members.values())
    assert train.y[: len(members["digits"].splits["train"])].max() <= 4  # digits first
    assert train.y[len(members["digits"].splits["train"]) :].min() >= 5  # views shifted past
    assert "test" not in joint.splits


@pytest.mark.parametrize(
    ("drop", "missing"), [("audio", "audio"), ("synthesis", "synthesis"), ("split", "split.val")]
)
def test_a_params_yaml_beside_dvc_yaml_holds_every_key_dvc_reads(
    tmp_path: Path, drop: str, missing: str
) -> None:
    """DVC reads params.yaml itself and refuses it without a key dvc.yaml lists, even where
    our schema has a default: such a file (one written before `audio` and `synthesis` came) is
    refused by key, before any work; an override does not stand in for the file."""
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    doc = yaml.safe_load(TINY.read_text())
    if drop == "split":
        doc["split"] = {"test": 0.2, "seed": 0}  # split.val left out
    else:
        del doc[drop]
    path = write(tmp_path, yaml.safe_dump(doc))
    with pytest.raises(ParamsError, match=rf"^{path}: {missing}: missing; dvc.yaml reads it"):
        load_params(path, [f"{missing}={{}}"] if drop == "synthesis" else [])
    (tmp_path / "dvc.yaml").unlink()  # elsewhere the schema's defaults stand
    assert load_params(path).audio.n_mels == 40
