"""Dataset sources, a registry by `kind`: the built-in MNIST-1D generator and a user's arrays
in .npz. Each loads, checks and returns raw arrays; `build_splits` turns them into the fixed,
stratified splits that `prepare` writes."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data.datasets import SPLITS, DataError, Labelled, keep_classes, stratified_split
from tasks.data.mnist1d_fast import make_dataset_fast
from tasks.config.params import DatasetSpec, Mnist1dArgs, Params, SplitParams


@dataclass(frozen=True)
class RawDataset:
    pool: Labelled  # everything that is not a given test set; split into train/val (and test)
    test: Labelled | None  # the source's own test set, when it ships one


def _mnist1d(spec: DatasetSpec) -> RawDataset:
    """Generate with the published MNIST-1D generator (mnist1d.data.make_dataset), or its
    vectorised twin (tasks/data/mnist1d_fast.py) with `engine: fast`."""
    from mnist1d.data import get_dataset_args, get_templates, make_dataset
    from mnist1d.utils import ObjectView

    gen: Mnist1dArgs = spec.generator_args
    args = get_dataset_args(as_dict=True) | gen.model_dump(exclude={"engine"})
    args["padding"] = list(gen.padding)
    templates = get_templates()
    if spec.classes is not None:
        if max(spec.classes) >= len(templates["y"]):
            raise DataError(f"mnist1d has classes 0-9; classes {spec.classes} asks for more")
        # Generating from a template subset spends all num_samples on the wanted classes.
        keep = np.asarray(spec.classes)
        templates = {"x": templates["x"][keep], "t": templates["t"], "y": templates["y"][keep]}
    if gen.engine == "fast":
        data = make_dataset_fast(args, templates)
    else:
        data = make_dataset(ObjectView(args), template=templates)
    # make_dataset's own 80/20 cut is not stratified; pool it and split it our way.
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return RawDataset(pool=Labelled(x, y), test=None)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err


def _check_pair(path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> Labelled:
    if x.ndim not in (2, 3):
        raise DataError(f"{path}: '{xname}' must have shape (N, L) or (N, C, L), got {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{path}: '{yname}' must have shape (N,), got {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: '{xname}' has {len(x)} rows but '{yname}' has {len(y)}")
    if len(y) == 0:
        raise DataError(f"{path}: '{xname}' and '{yname}' hold no examples")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: '{xname}' must be real numbers, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{path}: '{xname}' has NaN or inf values in {bad} examples")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: '{yname}' must hold integer labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{path}: '{yname}' has negative labels (min {y.min()})")
    # Models compute in float32: refuse values that would not survive the cast, rather than
    # silently turning them into inf.
    with np.errstate(over="ignore"):
        as_float32 = x.astype(np.float32)
    if not np.isfinite(as_float32).all():
        raise DataError(f"{path}: '{xname}' has values beyond float32's range (|x| > 3.4e38)")
    return Labelled(as_float32[:, None, :] if x.ndim == 2 else as_float32, y.astype(np.int64))


def _npz(spec: DatasetSpec) -> RawDataset:
    """A user's arrays: x (N, L) or (N, C, L), y (N,), and optionally x_test, y_test."""
    path = spec.path
    arrays = _npz_arrays(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {sorted(arrays) or 'none'})")
    pool = _check_pair(path, arrays["x"], arrays["y"], "x", "y")
    test = None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: 'x_test' and 'y_test' must come together")
    if "x_test" in arrays:
        test = _check_pair(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
        if test.x.shape[1:] != pool.x.shape[1:]:
            raise DataError(
                f"{path}: 'x_test' examples have shape {test.x.shape[1:]}, "
                f"'x' has {pool.x.shape[1:]}"
            )
    labels = np.unique(pool.y)
    if spec.classes is None and not np.array_equal(labels, np.arange(len(labels))):
        raise DataError(
            f"{path}: labels in 'y' must run 0..K-1 without gaps, got {labels.tolist()}"
            " (or name the ones to keep in 'classes')"
        )
    return RawDataset(pool=pool, test=test)


SOURCES: dict[str, Callable[[DatasetSpec], RawDataset]] = {"mnist1d": _mnist1d, "npz": _npz}


def build_splits(
    spec: DatasetSpec, split: SplitParams, where: str
) -> tuple[dict[str, Labelled], list[int]]:
    """Load a dataset by its kind, keep its classes, and cut fixed stratified splits.

    Returns the splits (labels 0..K-1) and the original label of each class index.
    """
    raw = SOURCES[spec.kind](spec)
    classes = spec.classes if spec.classes is not None else np.unique(raw.pool.y).tolist()
    pool = keep_classes(raw.pool, classes, where)
    if raw.test is None:
        cuts = {"val": split.val, "test": split.test}
        index = stratified_split(pool.y, cuts, split.seed, where)
        return {name: pool.take(index[name]) for name in SPLITS}, classes
    test = keep_classes(raw.test, classes, f"{where} (test arrays)")
    index = stratified_split(pool.y, {"val": split.val}, split.seed, where)
    splits = {"train": pool.take(index["train"]), "val": pool.take(index["val"]), "test": test}
    return splits, classes


def datasets(params: Params) -> dict[str, tuple[DatasetSpec, str]]:
    """Every dataset of the study by name, with where it comes from for error messages: the
    params key, and the user's file or the built-in kind."""
    named = {"source": ("source", params.source)}
    named |= {name: (f"targets.{name}", spec) for name, spec in params.targets.items()}
    return {name: (spec, f"{key} ({spec.path or spec.kind})") for name, (key, spec) in named.items()}


def check_user_data(params: Params) -> None:
    """Read and check every user data file as `prepare` will, writing nothing: the pre-flight
    check before a run. Built-in generators are left to `prepare` (they cost real time)."""
    for spec, where in datasets(params).values():
        if spec.path is not None:
            build_splits(spec, params.split, where)
