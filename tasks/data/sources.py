"""Dataset sources, a registry by `kind`: the built-in MNIST-1D generator, a user's arrays in .npz
(tasks/data/npz.py), texts (tasks/data/text.py), images (tasks/data/images.py) and sounds
(tasks/data/audio.py: a user's folder, or a corpus that stage synthesize rendered). Each loads,
checks and returns raw arrays with their labels as stored; `build_splits` keeps the wanted
classes and turns them into the fixed, stratified splits that `prepare` writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.config.params import (
    AUDIO_KINDS,
    FOLDER_KINDS,
    IMAGE_BACKBONES,
    AudioParams,
    DatasetSpec,
    ImageParams,
    Mnist1dArgs,
    Params,
    SplitParams,
)
from tasks.data.datasets import (
    SPLITS,
    DataError,
    Labelled,
    RawDataset,
    keep_classes,
    stratified_split,
)
from tasks.data.audio import read_audio
from tasks.data.folders import per_class_draw
from tasks.data.images import image_files, read_images
from tasks.data.mnist1d_fast import make_dataset_fast
from tasks.data.npz import listed, read_npz, sorted_labels
from tasks.data.text import read_fortunes, read_text_table
from tasks.workspace.layout import Layout

TestSource = Literal["shipped", "cut", "none"]


@dataclass(frozen=True)
class Decoding:
    """What files become, by params: images of `image`'s size and channels (an image study's;
    None otherwise), and sounds as `audio`'s spectrograms, which are images where `image` is
    set; `layout`: where the synthesised corpora are."""

    image: ImageParams | None = None
    audio: AudioParams = field(default_factory=AudioParams)
    layout: Layout = Layout()

    def audio_folder(self, spec: DatasetSpec) -> Path:
        """The folder a dataset of kind audio reads: its own, or its corpus's."""
        return spec.path if spec.path is not None else self.layout.synthesized(str(spec.corpus))


@dataclass(frozen=True)
class BuiltDataset:
    splits: dict[str, Labelled]  # train, val, and test unless test_source is "none"; x: (N, C, L)
    # signals, (N, C, H, W) images, or (N,) texts until `prepare` makes them (N, max_tokens) ids
    classes: list[int | str]  # the original label of each class index 0..K-1
    test_source: TestSource  # the test split: shipped with the data, cut from it, or none

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, L) or (C, H, W) of every example."""
        return tuple(self.splits["train"].x.shape[1:])


def files_read(spec: DatasetSpec) -> list[Path]:
    """The user's or the system's files a dataset is read from (none for a generator): what
    `prepare` records by md5, and what the report names."""
    if spec.kind == "fortunes":  # each class file, and the index and UTF-8 twin it may use
        named = [spec.fortunes_dir / str(name) for name in spec.classes or []]
        near = [p.with_name(p.name + end) for p in named for end in ("", ".dat", ".u8")]
        return [path for path in near if path.is_file()]
    if spec.kind in FOLDER_KINDS:
        return image_files(spec)
    return [spec.path] if spec.path is not None else []


def describe(spec: DatasetSpec, key: str) -> str:
    """Where a dataset comes from, for messages: its params key and the user's file (or kind)."""
    origin = spec.path or (f"corpus {spec.corpus}" if spec.corpus else spec.kind)
    return f"{key} ({origin})"


def _mnist1d(spec: DatasetSpec, key: str) -> RawDataset:
    """Generate with the published MNIST-1D generator (mnist1d.data.make_dataset), or its
    vectorised twin (tasks/data/mnist1d_fast.py) with `engine: fast`."""
    from mnist1d.data import get_dataset_args, get_templates, make_dataset
    from mnist1d.utils import ObjectView

    gen: Mnist1dArgs = spec.generator_args
    args = get_dataset_args(as_dict=True) | gen.model_dump(exclude={"engine"})
    args["padding"] = list(gen.padding)
    templates = get_templates()
    if spec.classes is not None:
        wanted = [int(c) for c in spec.classes]  # ints 0-9: DatasetSpec checks kind mnist1d's
        if max(wanted) >= len(templates["y"]):
            raise DataError(f"mnist1d has classes 0-9; classes {spec.classes} asks for more")
        # Generating from a template subset spends all num_samples on the wanted classes.
        keep = np.asarray(wanted)
        templates = {"x": templates["x"][keep], "t": templates["t"], "y": templates["y"][keep]}
    if gen.engine == "fast":
        data = make_dataset_fast(args, templates)
    else:
        data = make_dataset(ObjectView(args), template=templates)
    # make_dataset's own 80/20 cut is not stratified; pool it and split it our way.
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return RawDataset(pool=Labelled(x, y), test=None)


SOURCES: dict[str, Callable[[DatasetSpec, str], RawDataset]] = {
    "mnist1d": _mnist1d,
    "npz": read_npz,
    "text": read_text_table,
    "fortunes": read_fortunes,
}


# --- classes and splits ------------------------------------------------------------------------


def _chosen_classes(spec: DatasetSpec, y: np.ndarray, where: str) -> list[int | str]:
    """The original label of each class index: `classes` as listed, matched to the stored
    labels by text (YAML 1 finds the stored '1'), or every stored label in class order."""
    stored = sorted_labels(y)
    if spec.classes is None:
        return stored
    by_text = {str(label): label for label in stored}
    missing = [label for label in spec.classes if str(label) not in by_text]
    if missing:
        raise DataError(
            f"{where}: classes {missing} have no examples (labels in the data: {listed(stored)})"
        )
    return [by_text[str(label)] for label in spec.classes]


def _cut(
    pool: Labelled, fractions: dict[str, float], seed: int, where: str, classes: list[int | str]
) -> dict[str, Labelled]:
    index = stratified_split(pool.y, fractions, seed, where, classes)
    return {name: pool.take(index[name]) for name in SPLITS if name in index}


def build_splits(
    spec: DatasetSpec,
    split: SplitParams,
    key: str,
    cut_test: bool = True,
    decoding: Decoding | None = None,
) -> BuiltDataset:
    """Load a dataset by its kind (`key`: its params key), keep its classes, relabel them
    0..K-1, and cut fixed stratified splits: train and val from its pool, and as test the
    arrays it ships, else a cut from the pool if `cut_test`, else none. `decoding` says what
    images and sounds become (by default: signals, and sounds at AudioParams' defaults)."""
    decoding = decoding or Decoding()
    if spec.kind in AUDIO_KINDS:
        as_image = decoding.image is not None
        raw = read_audio(spec, key, decoding.audio, decoding.audio_folder(spec), as_image)
    elif decoding.image is not None:
        raw = read_images(spec, key, decoding.image)
    else:
        raw = SOURCES[spec.kind](spec, key)
    return _splits(raw, spec, split, key, cut_test)


def _splits(
    raw: RawDataset, spec: DatasetSpec, split: SplitParams, key: str, cut_test: bool
) -> BuiltDataset:
    """`build_splits` once the dataset is read."""
    where = describe(spec, key)
    classes = _chosen_classes(spec, raw.pool.y, where)
    pool = keep_classes(raw.pool, classes, where)
    if raw.test is not None:
        test = keep_classes(raw.test, classes, f"{where} (test arrays)")
        splits = _cut(pool, {"val": split.val}, split.seed, where, classes) | {"test": test}
        return BuiltDataset(splits, classes, "shipped")
    fractions = {"val": split.val} | ({"test": split.test} if cut_test else {})
    splits = _cut(pool, fractions, split.seed, where, classes)
    return BuiltDataset(splits, classes, "cut" if cut_test else "none")


def cuts_test(key: str) -> bool:
    """Whether the dataset of params key `key` gets a test split cut when it ships none: every
    target does; a source does not (pretraining uses train and val only)."""
    return key.startswith("targets.")


def datasets(params: Params) -> dict[str, tuple[DatasetSpec, str]]:
    """Every dataset read from files or a generator, by name, with its params key (for
    messages): the sources but the joint ones (`unite` builds those), and the targets."""
    named = {
        name: (spec, f"sources.{name}")
        for name, spec in params.sources.items()
        if spec.kind != "joint"
    }
    return named | {name: (spec, f"targets.{name}") for name, spec in params.targets.items()}


def unite(members: dict[str, BuiltDataset], key: str) -> BuiltDataset:
    """A joint source: the members' train and val splits end to end, in the order named, each
    member's classes kept apart (member k's labels shifted past those before it, and named
    `member:label`). No test split: pretraining scores none."""
    shapes = {name: data.input_shape for name, data in members.items()}
    if len(set(shapes.values())) > 1:
        listed_shapes = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DataError(f"{key}: its sources' examples differ in shape ({listed_shapes})")
    offsets = np.cumsum([0] + [len(data.classes) for data in members.values()])
    splits = {
        split: Labelled(
            np.concatenate([data.splits[split].x for data in members.values()]),
            np.concatenate(
                [data.splits[split].y + shift for data, shift in zip(members.values(), offsets)]
            ),
        )
        for split in ("train", "val")
    }
    classes = [f"{name}:{label}" for name, data in members.items() for label in data.classes]
    return BuiltDataset(splits, classes, "none")


def decoding(params: Params, layout: Layout | None = None) -> Decoding:
    """What images and sounds become in this study, with its corpora where `layout` has them."""
    image = params.image if params.model.backbone in IMAGE_BACKBONES else None
    return Decoding(image, params.audio, layout or Layout())


def check_user_data(params: Params) -> dict[str, tuple[int, ...]]:
    """Read and check every user data file as `prepare` will, writing nothing: the pre-flight
    check before a run. Returns each dataset's input shape, (C, L), (C, H, W) for images or
    (max_tokens,) for texts; built-in generators are not run (they cost real time): their shape
    follows from their params."""
    shapes = {}
    how = decoding(params)
    for name, (spec, key) in datasets(params).items():
        if params.model.modality == "text":  # cheap to read: the fortunes are read, too
            build_splits(spec, params.split, key, cut_test=cuts_test(key))
            shapes[name] = (params.text.max_tokens,)
        elif spec.path is not None:
            built = build_splits(spec, params.split, key, cuts_test(key), how)
            shapes[name] = built.input_shape
        elif spec.corpus is not None:  # rendered later, by stage synthesize
            _check_corpus_splits(params, spec, key)
            spectrogram = (params.audio.n_mels, params.audio.frames)
            shapes[name] = (1, *spectrogram) if how.image is not None else spectrogram
        else:
            shapes[name] = (1, spec.generator_args.final_seq_length)
    return shapes


def _check_corpus_splits(params: Params, spec: DatasetSpec, key: str) -> None:
    """The classes and splits of a corpus not rendered yet, from its labels alone (each
    spoken per_word times): a missing class, or too few sounds to split, is refused now rather
    than after the synthesis."""
    corpus = params.synthesis[str(spec.corpus)]
    y = np.repeat(np.array([str(label) for label in corpus.words]), corpus.per_word)  # (N,)
    y = y[per_class_draw(y, spec.max_per_class)]
    nothing = np.zeros((len(y), 0), dtype=np.float32)  # the sounds are not there yet
    _splits(RawDataset(Labelled(nothing, y), None), spec, params.split, key, cuts_test(key))
