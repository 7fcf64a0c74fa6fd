"""A user's arrays in .npz, read and checked as the public archives (UCR/UEA) export them:
x (N, L) or (N, C, L) with series of unequal length as NaN-padded tails, y (N,) with labels as
integers (any values), integral floats or strings, and optionally x_test, y_test. Every problem
is refused in one line that names the file, the array and the fix."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.config.params import DatasetSpec
from tasks.data.datasets import DataError, Labelled, RawDataset

DECIMAL = re.compile(r"0|-?[1-9][0-9]*")  # a label written as a plain integer: '7', '-2', '10'
SHOWN = 5  # labels named in one message at most


# --- the file ---------------------------------------------------------------------


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds one array, not named ones; save np.savez(path, x=x, y=y)")
    with loaded as archive:
        return {key: _npz_member(path, archive, key) for key in archive.files}


def _npz_member(path: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as err:
        # numpy refuses object arrays without pickle, which could run code from the file
        if "allow_pickle" in str(err):
            raise DataError(_object_array_message(path, key)) from err
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err


def _object_array_message(path: Path, key: str) -> str:
    if key.startswith("y"):
        before = "x=x, " if key == "y" else "..., "
        fix = (
            "save labels as fixed-width strings or integers, e.g. "
            f"np.savez(path, {before}{key}=np.asarray({key}, dtype=str))"
        )
    else:
        fix = (
            "save series as one float array (N, L) or (N, C, L), NaN-padded at the end where "
            "lengths differ"
        )
    return f"{path}: '{key}' is an object array, which cannot be loaded safely; {fix}"


def check_keys(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {sorted(arrays) or 'none'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: 'x_test' and 'y_test' must come together")


def _check_shapes(path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    if x.ndim not in (2, 3):
        raise DataError(f"{path}: '{xname}' must have shape (N, L) or (N, C, L), got {x.shape}")
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: '{xname}' has shape {x.shape}: no channels or no time steps")
    check_pairs(path, x, y, xname, yname, "rows")


def check_pairs(
    path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str, unit: str
) -> None:
    """y (N,): one label for each of x's N examples (`unit`: what they are called), and N > 0."""
    if y.ndim != 1:
        raise DataError(f"{path}: '{yname}' must have shape (N,), got {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: '{xname}' has {len(x)} {unit} but '{yname}' has {len(y)}")
    if len(y) == 0:
        raise DataError(f"{path}: '{xname}' and '{yname}' hold no examples")


# --- series: NaN-padded tails, float32 ---------------------------------------------------------


def _series(path: Path, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (N, L) or (N, C, L) of real numbers -> (N, C, L) float32 with its NaN tails kept, and
    each example's length (N,): the values before its tail."""
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: '{name}' must be real numbers, got dtype {x.dtype}")
    series = x[:, None, :] if x.ndim == 2 else x
    lengths = _valid_lengths(path, name, series)
    return _as_float32(path, name, series), lengths


def _valid_lengths(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    """Each example's length (N,) for x (N, C, L): a prefix of values, then NaN to the end in
    every channel alike. Any other NaN, and inf, cannot be told from data and are refused."""
    _refuse_examples(path, name, np.isinf(x).any(axis=(1, 2)), "inf; replace them")
    nan = np.isnan(x)  # (N, C, L)
    width = x.shape[-1]
    first_nan = np.where(nan.any(axis=-1), nan.argmax(axis=-1), width)  # (N, C)
    tail_only = nan.sum(axis=-1) == width - first_nan  # (N, C): NaN from the first one on
    _refuse_examples(
        path, name, ~tail_only.all(axis=1), "a NaN before a number; fill or drop them"
    )
    _refuse_examples(
        path,
        name,
        (first_nan != first_nan[:, :1]).any(axis=1),
        "channels NaN-padded to different lengths; pad all channels of an example alike",
    )
    _refuse_examples(path, name, first_nan[:, 0] == 0, "NaN everywhere; drop them")
    return first_nan[:, 0]


def _refuse_examples(path: Path, name: str, bad: np.ndarray, problem: str) -> None:
    """Refuse the examples flagged in `bad` (N,), naming how many and the first."""
    if bad.any():
        raise DataError(
            f"{path}: '{name}' has NaN or inf values in {int(bad.sum())} examples (first: "
            f"index {int(np.argmax(bad))}): {problem}"
        )


def _as_float32(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    # Models compute in float32: refuse values that would not survive the cast, rather than
    # silently turning them into inf (x holds no inf by now; NaN tails stay NaN).
    with np.errstate(over="ignore"):
        as_float32 = x.astype(np.float32)
    if np.isinf(as_float32).any():
        raise DataError(f"{path}: '{name}' has values beyond float32's range (|x| > 3.4e38)")
    return as_float32


def _fit_lengths(
    spec: DatasetSpec, key: str, series: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    """One length for the whole dataset: `series` maps an array key to its (N, C, L) values
    with NaN tails and its lengths (N,); returns each as (N, C, L') float32, no NaN."""
    if spec.unequal_lengths == "resample":
        return _resample_all(spec.path, series)
    return _refuse_unequal(spec, key, series)


def _refuse_unequal(
    spec: DatasetSpec, key: str, series: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    fix = f"set {key}.unequal_lengths: resample"
    for name, (x, lengths) in series.items():
        short = lengths < x.shape[-1]
        if short.any():
            raise DataError(
                f"{key} ({spec.path}): '{name}' has {int(short.sum())} of {len(x)} examples "
                f"shorter than {x.shape[-1]} (lengths {lengths[short].min()}-"
                f"{lengths[short].max()}, NaN-padded at the end); {fix} to stretch each to the "
                "longest"
            )
    shapes = {name: x.shape[1:] for name, (x, _) in series.items()}
    if len(set(shapes.values())) > 1:
        same_channels = len({shape[0] for shape in shapes.values()}) == 1
        raise DataError(
            f"{spec.path}: 'x_test' examples have shape {shapes['x_test']}, 'x' has "
            f"{shapes['x']}" + (f"; if lengths differ, {fix}" if same_channels else "")
        )
    return {name: x for name, (x, _) in series.items()}


def _resample_all(
    path: Path | None, series: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    channels = {name: x.shape[1] for name, (x, _) in series.items()}
    if len(set(channels.values())) > 1:
        raise DataError(
            f"{path}: 'x_test' examples have {channels['x_test']} channels, 'x' has "
            f"{channels['x']}"
        )
    # the training arrays' longest, for x_test too: the test split decides nothing, not even
    # the input length (which the mlp backbone's size depends on)
    longest = int(series["x"][1].max())
    return {name: _resample(x, lengths, longest) for name, (x, lengths) in series.items()}


def _resample(x: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
    """(N, C, L) with example i valid up to lengths[i] -> (N, C, length) float32."""
    out = np.empty((len(x), x.shape[1], length), dtype=np.float32)
    for i, valid in enumerate(lengths):
        out[i] = _stretch(x[i, :, :valid], length)
    return out


def _stretch(values: np.ndarray, length: int) -> np.ndarray:
    """(C, n) -> (C, length) by linear interpolation; the first and last values are kept."""
    n = values.shape[-1]
    if n == length:
        return values
    grid = np.linspace(0, n - 1, length)  # where the new points fall on the old index axis
    return np.stack([np.interp(grid, np.arange(n), channel) for channel in values])


# --- labels as stored --------------------------------------------------------------------------


def canonical_labels(path: Path, name: str, y: np.ndarray) -> np.ndarray:
    """The stored labels (N,) in one canonical form: int64 for integers and integral floats,
    str for text (bytes decoded)."""
    if y.dtype.kind in "iu":
        if y.dtype == np.uint64 and y.max() > np.iinfo(np.int64).max:
            raise DataError(f"{path}: '{name}' has labels beyond int64's range (max {y.max()})")
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        return _integral_floats(path, name, y)
    if y.dtype.kind == "U":
        return y
    if y.dtype.kind == "S":
        try:
            return np.char.decode(y, "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: '{name}' has labels that are not UTF-8 text") from err
    raise DataError(
        f"{path}: '{name}' must hold integer, integral float or string labels, got dtype {y.dtype}"
    )


def _integral_floats(path: Path, name: str, y: np.ndarray) -> np.ndarray:
    """1.0, 2.0 -> 1, 2; a float that is not a whole number (1.5, NaN) is no label."""
    with np.errstate(invalid="ignore"):
        whole = np.isfinite(y) & (y == np.round(y)) & (np.abs(y) < 2.0**63)
    if not whole.all():
        raise DataError(
            f"{path}: '{name}' has labels that are not whole numbers ({int((~whole).sum())}, "
            f"e.g. {y[~whole][0]}); store integer or string labels"
        )
    return y.astype(np.int64)


def sorted_labels(y: np.ndarray) -> list[int | str]:
    """The distinct stored labels in class order: integers numerically, strings as strings,
    except when every string is a plain integer: then numerically, so that '10' follows '2'."""
    values = np.unique(y).tolist()
    if y.dtype.kind == "U" and all(DECIMAL.fullmatch(v) for v in values):
        values.sort(key=int)
    return values


def listed(labels: Sequence[int | str]) -> str:
    more = f" and {len(labels) - SHOWN} more" if len(labels) > SHOWN else ""
    return f"{list(labels[:SHOWN])}{more}"


def check_test_labels(path: Path, y: np.ndarray, y_test: np.ndarray) -> None:
    """Every test label must be a training label (matched by text, as `keep_classes` does)."""
    seen = set(y.astype(str).tolist())
    unseen = [label for label in sorted_labels(y_test) if str(label) not in seen]
    if unseen:
        raise DataError(
            f"{path}: 'y_test' has labels that 'y' has not: {listed(unseen)}; a test set can "
            "only score classes seen in training"
        )


def read_npz(spec: DatasetSpec, key: str) -> RawDataset:
    """A user's arrays: x (N, L) or (N, C, L), y (N,), and optionally x_test, y_test."""
    path = spec.path
    arrays = npz_arrays(path)
    check_keys(path, arrays)
    pairs = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    series, labels = {}, {}
    for xname, yname in pairs:
        _check_shapes(path, arrays[xname], arrays[yname], xname, yname)
        series[xname] = _series(path, xname, arrays[xname])
        labels[yname] = canonical_labels(path, yname, arrays[yname])
    if "y_test" in labels:
        check_test_labels(path, labels["y"], labels["y_test"])
    x = _fit_lengths(spec, key, series)
    test = Labelled(x["x_test"], labels["y_test"]) if "x_test" in x else None
    return RawDataset(pool=Labelled(x["x"], labels["y"]), test=test)
