"""Typed, frozen params: params.yaml is validated here, before any stage does work.

Every error names the dotted key and the file, on one line, so that a typo in a 40-minute run
costs a second. Stages take these objects, never raw dicts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")
Strategy = Literal["scratch", "linear_probe", "finetune", "lp_ft", "partial"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Seed = Annotated[int, Field(ge=0)]  # numpy seed sequences refuse negative entries
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ParamsError(ValueError):
    """A params document that cannot be used; the message is one line, fit for a user."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class RuntimeParams(_Frozen):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: PositiveInt = 1
    # torch.compile the pretraining model; off by default: on CPU it is slower for these small
    # models (bench/train_step.py: 0.84x); try it on a GPU
    compile: bool = False


class Mnist1dArgs(_Frozen):
    """The published MNIST-1D generator's knobs; defaults are the published values."""

    num_samples: PositiveInt = 5000
    template_len: PositiveInt = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: Annotated[float, Field(ge=0)] = 0.4
    max_translation: PositiveInt = 48
    corr_noise_scale: Annotated[float, Field(ge=0)] = 0.25
    iid_noise_scale: Annotated[float, Field(ge=0)] = 2e-2
    shear_scale: Annotated[float, Field(ge=0)] = 0.75
    shuffle_seq: bool = False
    final_seq_length: PositiveInt = 40
    seed: Seed = 42
    # reference: the published generator's own loop (reproduces the published data exactly);
    # fast: tasks/data/mnist1d_fast.py, the same distribution vectorised (~45x faster at 100k)
    engine: Literal["reference", "fast"] = "reference"


class DatasetSpec(_Frozen):
    kind: Literal["mnist1d", "npz"]
    # labels to keep as stored (ints or strings, matched by their text: 1 matches '1'),
    # relabelled 0..K-1 in this order; null: all, sorted
    classes: list[int | str] | None = None
    generator: Mnist1dArgs | None = None
    path: Path | None = None
    # series of unequal length in one dataset (NaN-padded at the end): refuse them, or stretch
    # each linearly to the dataset's longest (kind npz only)
    unequal_lengths: Literal["refuse", "resample"] = "refuse"

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_not_bool(cls, classes: Any) -> Any:
        # YAML `true` would pass as the int 1; a label is never a bool
        if isinstance(classes, list) and any(isinstance(c, bool) for c in classes):
            raise ValueError("labels are integers or strings, not true/false")
        return classes

    @field_validator("classes")
    @classmethod
    def _classes_nonempty_unique(cls, classes: list[int | str] | None) -> list[int | str] | None:
        if classes is not None and len(classes) == 0:
            raise ValueError("must name at least one class (or be null to keep all)")
        # 1 and '1' name the same stored label
        if classes is not None and len({str(c) for c in classes}) != len(classes):
            raise ValueError("lists a class twice")
        return classes

    @model_validator(mode="after")
    def _kind_matches_fields(self) -> DatasetSpec:
        if self.kind == "mnist1d" and self.path is not None:
            raise ValueError("'path' is only for kind npz")
        if self.kind == "mnist1d" and not all(
            isinstance(c, int) and 0 <= c <= 9 for c in self.classes or []
        ):
            raise ValueError(
                f"classes: kind mnist1d has classes 0-9 (integers), got {self.classes}"
            )
        if self.kind == "mnist1d" and self.unequal_lengths != "refuse":
            raise ValueError("'unequal_lengths' is only for kind npz (mnist1d series share L)")
        if self.kind == "npz" and self.generator is not None:
            raise ValueError("'generator' is only for kind mnist1d")
        if self.kind == "npz" and self.path is None:
            raise ValueError("kind npz needs 'path'")
        return self

    @property
    def generator_args(self) -> Mnist1dArgs:
        return self.generator or Mnist1dArgs()


class SplitParams(_Frozen):
    val: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test: Annotated[float, Field(gt=0, lt=1)] = 0.15
    seed: Seed = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitParams:
        if self.val + self.test >= 1:
            raise ValueError("val + test must be below 1, to leave a training split")
        return self


class ModelParams(_Frozen):
    backbone: Literal["cnn1d", "mlp"] = "cnn1d"
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 32, 32])
    kernel_size: PositiveInt = 5
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 256])


class TrainParams(_Frozen):
    """The knobs of one supervised training run; shared by pretraining and fine-tuning."""

    max_epochs: PositiveInt = 50
    patience: PositiveInt = 5
    batch_size: PositiveInt = 128
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class PretrainParams(TrainParams):
    lr: PositiveFloat = 3e-3
    seed: Seed = 0
    # > 1: the stage runs itself under torchrun as this many data-parallel processes
    # (tasks/learning/distributed.py); batch_size stays the global batch, split over them
    processes: PositiveInt = 1


class ExtractParams(_Frozen):
    batch_size: PositiveInt = 1024


class FinetuneParams(TrainParams):
    strategies: list[Strategy] = Field(default_factory=lambda: ["scratch", "linear_probe"])
    # label budgets: shares of a target's training split, and labels per class (few-shot)
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [1.0])
    shots: list[PositiveInt] = Field(default_factory=list)
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    lrs: list[PositiveFloat] = Field(default_factory=lambda: [3e-3])
    backbone_lr_scale: PositiveFloat = 0.1
    freeze_blocks: PositiveInt = 1
    probe_l2: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [1e-3])

    @field_validator("strategies", "seeds", "lrs", "probe_l2")
    @classmethod
    def _nonempty(cls, values: list[Any]) -> list[Any]:
        if not values:
            raise ValueError("must not be empty")
        return values

    @field_validator("strategies", "fractions", "shots", "seeds", "lrs", "probe_l2")
    @classmethod
    def _unique(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError("lists a value twice")
        return values

    @model_validator(mode="after")
    def _has_a_budget(self) -> FinetuneParams:
        if not self.fractions and not self.shots:
            raise ValueError("finetune needs at least one label budget in fractions or shots")
        return self

    @field_validator("strategies")
    @classmethod
    def _needs_baseline(cls, strategies: list[str]) -> list[str]:
        if "scratch" not in strategies or len(strategies) < 2:
            raise ValueError(
                "must include 'scratch' (every transfer result is paired with it) and at least "
                "one transfer strategy"
            )
        return strategies


class FlowParams(_Frozen):
    """Prefect only: no stage's output depends on these, so DVC does not track them."""

    retries: Annotated[int, Field(ge=0)] = 2
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 5.0
    deployment: str = "transfer-study"
    cron: str | None = None
    # where the fine-tuning groups run (flows/runners.py): threads of the flow's process, or
    # Dask workers (an existing cluster at dask_address, else a LocalCluster of `workers`)
    task_runner: Literal["threads", "dask"] = "threads"
    workers: PositiveInt = 2
    dask_address: str | None = None


class ParamsOrigin(_Frozen):
    """Where a Params came from: the file, its content's hash and the command line's overrides.
    Not part of the study: it names the execution in its report."""

    path: str
    sha256: str
    overrides: tuple[str, ...] = ()


class Params(_Frozen):
    experiment: str = "transfer-study"
    registered_model: str = "transfer-study-backbone"
    runtime: RuntimeParams = RuntimeParams()
    source: DatasetSpec
    targets: dict[str, DatasetSpec]
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    extract: ExtractParams = ExtractParams()
    finetune: FinetuneParams = FinetuneParams()
    flow: FlowParams = FlowParams()
    _origin: ParamsOrigin | None = PrivateAttr(default=None)  # set by load_params

    @property
    def origin(self) -> ParamsOrigin | None:
        return self._origin

    @model_validator(mode="after")
    def _partial_leaves_a_block_to_train(self) -> Params:
        blocks = self.model.channels if self.model.backbone == "cnn1d" else self.model.hidden
        if "partial" in self.finetune.strategies and self.finetune.freeze_blocks >= len(blocks):
            raise ValueError(
                f"finetune.freeze_blocks ({self.finetune.freeze_blocks}) must be below the "
                f"number of backbone blocks ({len(blocks)}), or 'partial' trains no block"
            )
        return self

    @field_validator("targets")
    @classmethod
    def _target_names(cls, targets: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        if not targets:
            raise ValueError("must name at least one target")
        for name in targets:
            if not TARGET_NAME.fullmatch(name) or name == "source":
                raise ValueError(
                    f"target name {name!r} must start with a letter or digit, hold only "
                    "A-Z a-z 0-9 _ -, and not be 'source'"
                )
        return targets


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _format_loc(loc: tuple[Any, ...]) -> str:
    """("finetune", "seeds", 1) -> "finetune.seeds.1: "; odd keys are quoted, so that a key
    holding a newline cannot break the one-line message."""
    parts = [str(p) if re.fullmatch(r"[\w-]+", str(p)) else repr(p) for p in loc]
    return f"{'.'.join(parts)}: " if parts else ""


def _format_validation_error(err: ValidationError, path: Path) -> str:
    problems = []
    for item in err.errors():
        key = _format_loc(item["loc"])  # "finetune.seeds.1: ", or "" for whole-file checks
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}unknown key")
        elif item["type"] == "missing":
            problems.append(f"{key}required key is missing")
        elif not key:
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{key}{item['msg']} (got {json.dumps(item['input'], default=str)})")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{path}: {problems[0]}{more}"


def _apply_override(doc: dict[str, Any], assignment: str, path: Path) -> None:
    """Set `a.b.c=value` in the raw document; the value is parsed as YAML (`[0, 1]`, `0.5`)."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key:
        raise ParamsError(
            f"override {assignment!r}: expected KEY=VALUE, e.g. finetune.seeds=[0,1]"
        )
    try:
        value = yaml.load(raw_value, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {key}: value {raw_value!r} is not valid YAML") from err
    node = doc
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ParamsError(f"{path}: override {key}: {prefix} is not a mapping")
        node = child
    node[leaf] = value


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> Params:
    """Read, override and validate a params file; raise ParamsError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: params file not found") from err
    except OSError as err:
        raise ParamsError(f"{path}: cannot read params file ({err.strerror})") from err
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path}: YAML does not parse{where}: {problem}") from err
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of params at the top level")
    for assignment in overrides:
        _apply_override(doc, assignment, path)
    try:
        params = Params.model_validate(doc)
    except ValidationError as err:
        raise ParamsError(_format_validation_error(err, path)) from err
    _check_paths_exist(params, path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()  # as `sha256sum` gives it
    params._origin = ParamsOrigin(path=str(path), sha256=sha256, overrides=tuple(overrides))
    return params


def _check_paths_exist(params: Params, path: Path) -> None:
    datasets = {"source": params.source} | {f"targets.{n}": s for n, s in params.targets.items()}
    for key, spec in datasets.items():
        if spec.path is not None and not spec.path.is_file():
            raise ParamsError(f"{path}: {key}.path: file {str(spec.path)!r} does not exist")
