"""Public datasets as the archives (UCR/UEA) export them to .npz: labels of any kind, series of
unequal length as NaN-padded tails, their own test splits, small classes; and how `prepare`
writes them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from tasks.config.params import DatasetSpec, Params, SplitParams
from tasks.data.datasets import MIN_VAL_PER_CLASS, SPLITS, DataError, load_meta, load_split
from tasks.data.sources import build_splits
from tasks.prepare import prepare
from tasks.recording.recorder import MemoryRecorder
from tasks.workspace.layout import Layout

SPLIT = SplitParams(val=0.2, test=0.2, seed=0)


def save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def spec_for(path: Path, **fields) -> DatasetSpec:
    return DatasetSpec(kind="npz", path=path, **fields)


def numbered(n: int, length: int = 6) -> np.ndarray:
    """(n, length) series whose first value is the row number, so that an example can be traced
    back to its stored label after the split has shuffled it."""
    x = np.zeros((n, length))
    x[:, 0] = np.arange(n)
    return x


def stored_label_of_each(split, stored: np.ndarray) -> list:
    """The stored label of every example of a split, found through its row number."""
    return [stored[int(row)] for row in split.x[:, 0, 0]]


# --- labels as stored --------------------------------------------------------------------------


def test_string_labels_are_ordered_numerically_when_all_are_integers(tmp_path: Path) -> None:
    y = np.array(["10", "2", "1"] * 5)  # as text, '10' would sort before '2'
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    built = build_splits(spec_for(path), SPLIT, "targets.d")
    assert built.classes == ["1", "2", "10"]  # the stored strings, in numeric order
    for split in built.splits.values():
        assert [built.classes[i] for i in split.y] == stored_label_of_each(split, y)


def test_classes_named_as_integers_find_string_labels(tmp_path: Path) -> None:
    y = np.array(["10", "2", "1"] * 5)
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    spec = DatasetSpec.model_validate({"kind": "npz", "path": path, "classes": [10, 2]})
    built = build_splits(spec, SPLIT, "targets.d")
    assert built.classes == ["10", "2"]  # the listed order; the labels as stored
    kept = np.concatenate([stored_label_of_each(s, y) for s in built.splits.values()])
    assert sorted(set(kept.tolist())) == ["10", "2"] and len(kept) == 10
    train = built.splits["train"]
    assert [built.classes[i] for i in train.y] == stored_label_of_each(train, y)


def test_text_labels_sort_as_text_and_bytes_are_decoded(tmp_path: Path) -> None:
    y = np.array([b"walk", b"run", b"10", b"9"] * 4)  # not all integers: plain text order
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    built = build_splits(spec_for(path), SPLIT, "targets.d")
    assert built.classes == sorted(["walk", "run", "10", "9"])


def test_integer_labels_keep_gaps_and_negatives_in_numeric_order(tmp_path: Path) -> None:
    y = np.array([7, -3, 2] * 5)
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    built = build_splits(spec_for(path), SPLIT, "targets.d")
    assert built.classes == [-3, 2, 7]
    for split in built.splits.values():
        assert [built.classes[i] for i in split.y] == stored_label_of_each(split, y)


def test_integral_float_labels_become_ints(tmp_path: Path) -> None:
    y = np.array([2.0, 1.0, 3.0] * 5)
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    classes = build_splits(spec_for(path), SPLIT, "targets.d").classes
    assert classes == [1, 2, 3] and all(type(c) is int for c in classes)


def test_object_labels_are_refused_with_the_fix(tmp_path: Path) -> None:
    y = np.array(["a", "b"] * 5, dtype=object)  # what np.asarray(list_of_str) does not make
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    with pytest.raises(DataError) as caught:
        build_splits(spec_for(path), SPLIT, "targets.d")
    message = str(caught.value)
    assert message.startswith(f"{path}: 'y' is an object array") and "\n" not in message
    assert "np.savez(path, x=x, y=np.asarray(y, dtype=str))" in message


def test_a_test_label_unseen_in_training_is_named(tmp_path: Path) -> None:
    path = save(
        tmp_path / "d.npz",
        x=numbered(10),
        y=np.array(["a", "b"] * 5),
        x_test=numbered(3),
        y_test=np.array(["a", "b", "zebra"]),
    )
    with pytest.raises(DataError, match=r"'y_test' has labels that 'y' has not: \['zebra'\]"):
        build_splits(spec_for(path), SPLIT, "targets.d")


def test_shipped_test_labels_use_the_training_map(tmp_path: Path) -> None:
    y_test = np.array(["10", "2", "2", "1"])
    path = save(
        tmp_path / "d.npz",
        x=numbered(12),
        y=np.array(["1", "2", "10"] * 4),
        x_test=numbered(4),
        y_test=y_test,
    )
    built = build_splits(spec_for(path), SPLIT, "targets.d")
    # the shipped test set is kept whole and in order
    assert [built.classes[i] for i in built.splits["test"].y] == y_test.tolist()


def test_split_messages_name_the_stored_label(tmp_path: Path) -> None:
    y = np.array(["cat"] * 2 + ["dog"] * 10)
    path = save(tmp_path / "d.npz", x=numbered(len(y)), y=y)
    with pytest.raises(DataError, match=r"class cat has 2 examples"):
        build_splits(spec_for(path), SPLIT, "targets.d")


@pytest.mark.parametrize(
    ("classes", "problem"),
    [
        ("[true, false]", "not true/false"),
        ("[1, '1']", "lists a class twice"),
        ("[]", "must name at least one class"),
    ],
)
def test_params_classes_are_checked(classes: str, problem: str) -> None:
    doc = yaml.safe_load(f"{{kind: npz, path: d.npz, classes: {classes}}}")
    with pytest.raises(ValidationError, match=problem):
        DatasetSpec.model_validate(doc)


def test_params_classes_keep_yaml_ints_and_strings_apart() -> None:
    doc = yaml.safe_load("{kind: npz, path: d.npz, classes: [1, '2', walk]}")
    assert DatasetSpec.model_validate(doc).classes == [1, "2", "walk"]


@pytest.mark.parametrize(
    "fields", [{"classes": ["3"]}, {"classes": [10]}, {"unequal_lengths": "resample"}]
)
def test_params_mnist1d_takes_digits_and_equal_lengths_only(fields: dict) -> None:
    with pytest.raises(ValidationError):
        DatasetSpec.model_validate({"kind": "mnist1d", **fields})


# --- series of unequal length ------------------------------------------------------------------


def padded(lengths: list[int], width: int, channels: int = 1) -> np.ndarray:
    """(N, C, width): example i holds lengths[i] values (row number, then a ramp), NaN after."""
    x = np.full((len(lengths), channels, width), np.nan)
    for i, n in enumerate(lengths):
        x[i, :, :n] = np.arange(n) + 100 * i
    return x


def test_nan_padded_tails_are_refused_with_the_fix(tmp_path: Path) -> None:
    lengths = [7, 5, 7, 3, 7, 6] * 2  # 8 of 12 are shorter than the array's 7 steps
    path = save(tmp_path / "d.npz", x=padded(lengths, 7), y=np.arange(12) % 2)
    with pytest.raises(DataError) as caught:
        build_splits(spec_for(path), SPLIT, "targets.gunpoint")
    message = str(caught.value)
    shorter = [n for n in lengths if n < 7]
    assert str(path) in message and "'x'" in message and "\n" not in message
    assert f"{len(shorter)} of {len(lengths)} examples shorter than 7" in message
    assert f"lengths {min(shorter)}-{max(shorter)}" in message
    assert "set targets.gunpoint.unequal_lengths: resample" in message


def test_resampling_stretches_each_prefix_to_the_longest_training_series(tmp_path: Path) -> None:
    # x: 7 steps wide, none longer than 4; x_test: one example of 5 (longer), one of 3. The
    # length comes from x alone: the test split decides nothing, not even the input length.
    lengths = [4, 3, 4, 2] * 2
    x = padded(lengths, width=7, channels=2)
    x_test = np.full((2, 2, 6), np.nan)
    x_test[0, :, :5] = [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]
    x_test[1, :, :3] = [[0, 4, 2], [1, 1, 7]]
    path = save(tmp_path / "d.npz", x=x, y=np.arange(8) % 2, x_test=x_test, y_test=[0, 1])
    built = build_splits(spec_for(path, unequal_lengths="resample"), SPLIT, "targets.d")
    assert {s.x.shape[1:] for s in built.splits.values()} == {(2, 4)}
    test = built.splits["test"].x  # kept whole and in order
    # 5 values onto 4 points: the new points fall at 0, 4/3, 8/3, 4 on the old axis
    np.testing.assert_allclose(test[0], [[1, 7 / 3, 11 / 3, 5], [5, 11 / 3, 7 / 3, 1]], rtol=1e-6)
    # 3 values onto 4 points: at 0, 2/3, 4/3, 2
    np.testing.assert_allclose(test[1], [[0, 8 / 3, 10 / 3, 2], [1, 1, 3, 7]], rtol=1e-6)
    assert not any(np.isnan(s.x).any() for s in built.splits.values())
    for split in ("train", "val"):  # a ramp stays a ramp from its first to its last value
        for row in built.splits[split].x:
            start = row[0, 0]
            last = start + lengths[int(start // 100)] - 1
            np.testing.assert_allclose(row, [np.linspace(start, last, 4)] * 2, rtol=1e-6)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ([1.0, np.nan, 2.0, np.nan], "a NaN before a number"),
        ([np.nan] * 4, "NaN everywhere"),
    ],
)
@pytest.mark.parametrize("unequal_lengths", ["refuse", "resample"])
def test_nan_that_is_not_a_tail_is_refused(
    tmp_path: Path, row: list[float], problem: str, unequal_lengths: str
) -> None:
    x = np.ones((10, 4))
    x[3] = row
    path = save(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    spec = spec_for(path, unequal_lengths=unequal_lengths)
    pattern = rf"{path}: 'x' has NaN or inf values in 1 examples \(first: index 3\): {problem}"
    with pytest.raises(DataError, match=pattern):
        build_splits(spec, SPLIT, "targets.d")


def test_channels_padded_to_different_lengths_are_refused(tmp_path: Path) -> None:
    x = np.ones((10, 2, 5))
    x[4, 1, 3:] = np.nan  # channel 1 of example 4 ends early, channel 0 does not
    path = save(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"index 4\): channels NaN-padded to different lengths"):
        build_splits(spec_for(path, unequal_lengths="resample"), SPLIT, "targets.d")


def test_equal_lengths_pass_through_resampling_unchanged(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(12, 3, 9))
    path = save(tmp_path / "d.npz", x=x, y=np.arange(12) % 2)
    plain = build_splits(spec_for(path), SPLIT, "targets.d").splits
    resampled = build_splits(spec_for(path, unequal_lengths="resample"), SPLIT, "targets.d")
    for name in SPLITS:
        np.testing.assert_array_equal(resampled.splits[name].x, plain[name].x)


# --- prepare: the source's test split, small validation splits, meta.json ----------------------


def params_for(source: Path, targets: dict[str, Path], **split) -> Params:
    return Params.model_validate(
        {
            "source": {"kind": "npz", "path": source},
            "targets": {name: {"kind": "npz", "path": path} for name, path in targets.items()},
            "split": split or {"val": 0.2, "test": 0.2, "seed": 0},
        }
    )


def test_a_source_without_test_arrays_gets_train_and_val_only(tmp_path: Path) -> None:
    y_source = np.array([1.0, 2.0, 3.0] * 20)  # integral floats: ints in meta.json
    source = save(tmp_path / "source.npz", x=numbered(60), y=y_source)
    target = save(tmp_path / "target.npz", x=numbered(30), y=np.array(["b", "a"] * 15))
    layout = Layout(tmp_path / "workspace")
    stale = layout.prepared("source") / "test.npz"  # cut by an older version of prepare
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")

    sizes = prepare(params_for(source, {"t": target}), layout, MemoryRecorder())

    assert sorted(p.name for p in layout.prepared("source").iterdir()) == [
        "meta.json",
        "train.npz",
        "val.npz",
    ]
    meta = load_meta(layout.prepared("source"))
    assert meta["test_source"] == "none" and meta["classes"] == [1, 2, 3]
    assert set(sizes["source"]) == {"train", "val"} and sum(sizes["source"].values()) == 60
    # a target without test arrays still gets one cut
    target_meta = load_meta(layout.prepared("t"))
    assert target_meta["test_source"] == "cut" and target_meta["classes"] == ["a", "b"]
    assert all((layout.prepared("t") / f"{s}.npz").is_file() for s in SPLITS)


def test_a_source_that_ships_test_arrays_keeps_them(tmp_path: Path) -> None:
    source = save(
        tmp_path / "source.npz",
        x=numbered(30),
        y=np.arange(30) % 3,
        x_test=numbered(6),
        y_test=np.arange(6) % 3,
    )
    target = save(tmp_path / "target.npz", x=numbered(30), y=np.arange(30) % 2)
    layout = Layout(tmp_path / "workspace")
    prepare(params_for(source, {"t": target}), layout, MemoryRecorder())
    assert load_meta(layout.prepared("source"))["test_source"] == "shipped"
    np.testing.assert_array_equal(
        load_split(layout.prepared("source"), "test").y, np.arange(6) % 3
    )


def test_a_small_two_class_target_prepares_and_warns_of_its_validation_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    per_class, val, test = 25, 0.15, 0.15  # the default split: 4 validation examples a class
    source = save(tmp_path / "source.npz", x=numbered(80), y=np.arange(80) % 2)  # 40 a class
    target = save(tmp_path / "small.npz", x=numbered(2 * per_class), y=np.arange(50) % 2)
    layout = Layout(tmp_path / "workspace")
    with caplog.at_level(logging.WARNING, logger="tasks.prepare"):
        sizes = prepare(
            params_for(source, {"small": target}, val=val, test=test, seed=0),
            layout,
            MemoryRecorder(),
        )

    # every class cut by the same fractions, the rest left for training
    val_n, test_n = round(val * per_class), round(test * per_class)
    assert sizes["small"] == {
        "train": 2 * (per_class - val_n - test_n),
        "val": 2 * val_n,
        "test": 2 * test_n,
    }
    meta = load_meta(layout.prepared("small"))
    assert meta["val_class_counts"] == [val_n, val_n]
    assert meta["train_class_counts"] == [per_class - val_n - test_n] * 2
    assert val_n < MIN_VAL_PER_CLASS <= round(val * 40)  # the target warns, the source not
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0].getMessage()
    assert warned[0].getMessage().startswith("small: ") and "noisy" in warned[0].getMessage()
