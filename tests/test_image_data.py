"""Image sources: folders of class folders, MNIST-style IDX files, .npz arrays, and the
Animal-MNIST converter. Every bad input is refused in one line that names the file."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.config.params import DatasetSpec, ImageParams
from tasks.data import animal_mnist
from tasks.data.datasets import DataError
from tasks.data.images import image_files, read_images

FASHION = Path("/usr/share/datasets/fashion-mnist")
GREY8 = ImageParams(size=(8, 8), channels=1)
COLOUR8 = ImageParams(size=(8, 8), channels=3)


def pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write array (H, W) or (H, W, C) uint8 as an image file, converted to `mode` if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(path)
    return path


def folder(root: Path, counts: dict[str, int], shape: tuple[int, ...] = (8, 8)) -> Path:
    """root/<class>/<i>.png: `counts[class]` random images of `shape` per class."""
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            save(root / name / f"{i:02d}.png", pixels(100 * c + i, shape))
    return root


def read_folder(root: Path, image: ImageParams = GREY8, **spec) -> tuple[np.ndarray, np.ndarray]:
    data = read_images(DatasetSpec(kind="images", path=root, **spec), "source", image)
    assert data.test is None
    return data.pool.x, data.pool.y


def refused(spec: DatasetSpec, image: ImageParams = GREY8) -> str:
    with pytest.raises(DataError) as err:
        read_images(spec, "targets.a", image)
    message = str(err.value)
    assert "\n" not in message
    return message


def check_form(x: np.ndarray, n: int, image: ImageParams) -> None:
    assert x.shape == (n, image.channels, *image.size)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    assert x.min() >= 0 and x.max() <= 1


# --- kind images -------------------------------------------------------------------------------


def test_folder_reads_grey_images_with_class_names(tmp_path):
    root = folder(tmp_path / "root", {"dog": 2, "cat": 3})
    x, y = read_folder(root)
    check_form(x, 5, GREY8)
    assert y.dtype.kind == "U" and y.tolist() == ["cat"] * 3 + ["dog"] * 2  # classes sorted
    np.testing.assert_array_equal(x[0, 0], pixels(100, (8, 8)) / np.float32(255))  # cat/00.png
    assert image_files(DatasetSpec(kind="images", path=root)) == []


def test_grey_becomes_colour_by_repeating_its_channel(tmp_path):
    x, _ = read_folder(folder(tmp_path / "root", {"a": 2}), COLOUR8)
    check_form(x, 2, COLOUR8)
    assert (x[:, 0] == x[:, 1]).all() and (x[:, 0] == x[:, 2]).all()


def test_colour_becomes_grey_by_pillows_luma(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[0, 0] = (200, 100, 50)  # 200 * .299 + 100 * .587 + 50 * .114 = 124.2
    save(tmp_path / "root" / "a" / "x.png", rgb)
    x, _ = read_folder(tmp_path / "root")
    assert x[0, 0, 0, 0] == np.float32(124) / 255
    colour, _ = read_folder(tmp_path / "root", COLOUR8)
    np.testing.assert_array_equal(colour[0, :, 0, 0] * 255, [200, 100, 50])


def test_mixed_modes_are_converted(tmp_path):
    rgb = pixels(1, (8, 8, 3))
    root = tmp_path / "root"
    save(root / "a" / "1_rgb.png", rgb)
    save(root / "a" / "2_rgba.png", np.dstack([rgb, pixels(2, (8, 8))]))  # alpha dropped
    save(root / "a" / "3_palette.gif", rgb, mode="P")
    save(root / "a" / "4_grey.bmp", pixels(3, (8, 8)))
    save(root / "a" / "5_bilevel.tiff", pixels(3, (8, 8)), mode="1")
    save(root / "a" / "6_grey16.png", np.full((8, 8), 32768, dtype=np.uint16))
    x, _ = read_folder(root)
    check_form(x, 6, GREY8)
    luma = np.asarray(Image.fromarray(rgb).convert("L")) / np.float32(255)
    np.testing.assert_array_equal(x[0, 0], luma)
    np.testing.assert_array_equal(x[1, 0], luma)
    assert set(np.unique(x[4])) <= {0, 1}
    np.testing.assert_allclose(x[5], 32768 / 65535)  # 16 bits scaled, not clipped at 255


def test_mixed_channels_refused_names_the_file(tmp_path):
    root = folder(tmp_path / "root", {"a": 2})
    save(root / "b" / "00.png", pixels(7, (8, 8, 3)))
    message = refused(
        DatasetSpec(kind="images", path=root),
        COLOUR8.model_copy(update={"mixed_channels": "refuse"}),
    )
    assert message.startswith(f"{root / 'b' / '00.png'}: 3 channels")
    assert f"{root / 'a' / '00.png'} has 1 channel" in message
    assert "image.mixed_channels: convert" in message


def test_hidden_entries_are_ignored_and_suffixes_any_case(tmp_path):
    root = tmp_path / "root"
    save(root / "a" / "X.PNG", pixels(1, (8, 8)))
    save(root / "a" / "y.JpEg", pixels(2, (8, 8)))
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "a" / "._X.PNG").write_bytes(b"junk")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "notes.txt").write_text("not a class")
    x, y = read_folder(root)
    assert len(x) == 2 and y.tolist() == ["a", "a"]


def test_resize_gives_the_target_size(tmp_path):
    root = tmp_path / "root"
    save(root / "a" / "big.png", np.full((20, 30), 90, dtype=np.uint8))
    save(root / "a" / "small.png", pixels(1, (4, 6)))
    x, _ = read_folder(root)
    check_form(x, 2, GREY8)
    np.testing.assert_allclose(x[0], 90 / 255, atol=1e-6)  # a flat image stays flat


def test_other_size_refused_without_resize(tmp_path):
    root = folder(tmp_path / "root", {"a": 1}, shape=(10, 12))
    message = refused(
        DatasetSpec(kind="images", path=root), GREY8.model_copy(update={"resize": False})
    )
    assert message.startswith(f"{root / 'a' / '00.png'}: images of 10x12")
    assert "image.size is 8x8" in message and "image.resize: true" in message


def test_max_per_class_is_a_seeded_draw_that_decodes_only_the_kept(tmp_path):
    root = folder(tmp_path / "root", {"a": 6, "b": 2})
    kept = np.sort(np.random.default_rng([0, 0]).permutation(6)[:3])  # class a: index 0
    dropped = next(i for i in range(6) if i not in kept)
    (root / "a" / f"{dropped:02d}.png").write_bytes(b"not decoded, not refused")
    x, y = read_folder(root, max_per_class=3)
    again, _ = read_folder(root, max_per_class=3)
    assert y.tolist() == ["a"] * 3 + ["b"] * 2
    np.testing.assert_array_equal(x, again)
    for row, i in zip(x[:3], kept, strict=True):
        np.testing.assert_array_equal(row[0], pixels(i, (8, 8)) / np.float32(255))


def test_classes_pick_the_folders_decoded(tmp_path):
    """Only the listed classes are decoded: a broken file elsewhere is never read."""
    root = folder(tmp_path / "root", {"a": 2, "b": 3, "c": 1})
    (root / "c" / "00.png").write_bytes(b"not decoded, not refused")
    _, y = read_folder(root, classes=["b", "a"])
    assert sorted(y.tolist()) == ["a", "a", "b", "b", "b"]
    message = refused(DatasetSpec(kind="images", path=root, classes=["zebra"]))
    assert str(root) in message and "targets.a.classes" in message


def test_max_per_class_bounds_a_shipped_test_set_too(tmp_path):
    path = tmp_path / "arrays.npz"
    labels = np.arange(12) % 3
    np.savez(path, x=pixels(0, (12, 8, 8)), y=labels, x_test=pixels(1, (12, 8, 8)), y_test=labels)
    data = read_images(DatasetSpec(kind="npz", path=path, max_per_class=2), "source", GREY8)
    assert np.bincount(data.pool.y).tolist() == np.bincount(data.test.y).tolist() == [2, 2, 2]


def test_scramble_is_one_fixed_permutation(tmp_path):
    root = folder(tmp_path / "root", {"a": 2, "b": 1})
    plain, _ = read_folder(root)
    x, _ = read_folder(root, scramble_seed=5)
    order = np.random.default_rng(5).permutation(64)
    np.testing.assert_array_equal(x.reshape(3, 1, 64), plain.reshape(3, 1, 64)[:, :, order])
    np.testing.assert_array_equal(np.sort(x.reshape(3, -1)), np.sort(plain.reshape(3, -1)))
    assert not np.array_equal(x, plain) and x.flags.c_contiguous


def truncated_png(path: Path) -> Path:
    whole = io.BytesIO()
    Image.fromarray(pixels(0, (32, 32))).save(whole, format="png")
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    return path


FOLDER_PROBLEMS = {
    "corrupt image": (
        lambda r: (r / "a" / "01.png").write_bytes(b"\x89PNG junk"),
        "a/01.png",
        "not a readable image",
    ),
    "truncated image": (
        lambda r: truncated_png(r / "a" / "01.png"),
        "a/01.png",
        "not a readable image",
    ),
    "float image beyond 1": (
        lambda r: Image.fromarray(np.full((8, 8), 2.0, np.float32)).save(r / "a" / "01.tiff"),
        "a/01.tiff",
        "64 values outside [0, 1] or NaN (first: 2.0); store 8- or 16-bit images",
    ),
    "empty class": (lambda r: (r / "c").mkdir(), "c", "empty class folder"),
    "text file": (
        lambda r: (r / "a" / "notes.txt").write_text("hi"),
        "a/notes.txt",
        "not an image file",
    ),
    "nested folder": (lambda r: (r / "a" / "more").mkdir(), "a/more", "not an image file"),
    "file at root": (
        lambda r: (r / "labels.csv").write_text("x"),
        "labels.csv",
        "beside the class folders of targets.a.path",
    ),
}


@pytest.mark.parametrize("problem", FOLDER_PROBLEMS)
def test_bad_folder_refused_names_the_file(tmp_path, problem):
    root = folder(tmp_path / "root", {"a": 2, "b": 2})
    spoil, named, words = FOLDER_PROBLEMS[problem]
    spoil(root)
    message = refused(DatasetSpec(kind="images", path=root))
    assert message.startswith(f"{root / named}: ") and words in message


def test_root_without_class_folders_refused(tmp_path):
    (tmp_path / "root").mkdir()
    message = refused(DatasetSpec(kind="images", path=tmp_path / "root"))
    assert message.startswith(f"{tmp_path / 'root'}: no class folders in targets.a.path")


# --- kind idx ----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """uint8 array -> IDX: big-endian magic (0x0800 + ndim), each dimension's size, the data."""
    magic = 0x0800 + array.ndim if magic is None else magic
    dims = np.array(array.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_idx(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


IDX_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def idx_folder(root: Path, gz: bool, test: bool = True) -> Path:
    """12 training images of 6x5 (labels 0-2, 4 each) and, if `test`, 3 test images."""
    root.mkdir()
    arrays = [pixels(0, (12, 6, 5)), np.arange(12) % 3, pixels(1, (3, 6, 5)), np.arange(3)]
    for name, array in zip(IDX_NAMES[: 4 if test else 2], arrays, strict=False):
        write_idx(root / (name + ".gz" * gz), idx_bytes(array))
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_pool_and_shipped_test(tmp_path, gz):
    root = idx_folder(tmp_path / "mnist", gz)
    image = ImageParams(size=(6, 5), channels=1)
    data = read_images(DatasetSpec(kind="idx", path=root), "source", image)
    check_form(data.pool.x, 12, image)
    check_form(data.test.x, 3, image)
    assert data.pool.y.dtype == np.int64 and data.pool.y.tolist() == [0, 1, 2] * 4
    np.testing.assert_array_equal(data.pool.x[:, 0] * 255, pixels(0, (12, 6, 5)))
    assert image_files(DatasetSpec(kind="idx", path=root)) == [
        root / (n + ".gz" * gz) for n in IDX_NAMES
    ]


def test_idx_colour_resized_subsampled_scrambled(tmp_path):
    root = idx_folder(tmp_path / "mnist", gz=True)
    spec = DatasetSpec(kind="idx", path=root, max_per_class=2, scramble_seed=0)
    data = read_images(spec, "source", COLOUR8)
    check_form(data.pool.x, 6, COLOUR8)
    check_form(data.test.x, 3, COLOUR8)  # one per class: within max_per_class
    assert np.bincount(data.pool.y).tolist() == [2, 2, 2]
    assert (data.test.x[:, 0] == data.test.x[:, 2]).all()


def test_idx_without_test_pair(tmp_path):
    root = idx_folder(tmp_path / "mnist", gz=False, test=False)
    data = read_images(DatasetSpec(kind="idx", path=root), "source", ImageParams(size=(6, 5)))
    assert data.test is None and len(data.pool) == 12
    assert image_files(DatasetSpec(kind="idx", path=root)) == [root / n for n in IDX_NAMES[:2]]


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian():
    data = read_images(DatasetSpec(kind="idx", path=FASHION), "source", ImageParams())
    check_form(data.pool.x, 60000, ImageParams())
    check_form(data.test.x, 10000, ImageParams())
    assert np.unique(data.pool.y).tolist() == list(range(10))
    assert np.unique(data.test.y).tolist() == list(range(10))


def drop(root: Path, name: str) -> None:
    (root / name).unlink()


IDX_PROBLEMS = {
    "train images missing": (
        lambda r: drop(r, IDX_NAMES[0]),
        "",
        "train-images-idx3-ubyte[.gz] missing in targets.a.path",
    ),
    "train labels missing": (
        lambda r: drop(r, IDX_NAMES[1]),
        "",
        "train-labels-idx1-ubyte[.gz] missing",
    ),
    "test labels missing": (
        lambda r: drop(r, IDX_NAMES[3]),
        "",
        "t10k-labels-idx1-ubyte[.gz] missing",
    ),
    "wrong magic": (
        lambda r: write_idx(r / IDX_NAMES[0], idx_bytes(pixels(0, (12, 6, 5)), magic=0x0D03)),
        IDX_NAMES[0],
        "magic number 0x00000d03, not 0x00000803",
    ),
    "labels as images": (
        lambda r: write_idx(r / IDX_NAMES[1], idx_bytes(pixels(0, (12, 6, 5)))),
        IDX_NAMES[1],
        "magic number 0x00000803, not 0x00000801",
    ),
    "truncated": (
        lambda r: write_idx(r / IDX_NAMES[0], idx_bytes(pixels(0, (12, 6, 5)))[:-7]),
        IDX_NAMES[0],
        "the header says (12, 6, 5) (360 bytes of data), the file holds 353: truncated",
    ),
    "short header": (
        lambda r: write_idx(r / IDX_NAMES[1], b"\x00\x00"),
        IDX_NAMES[1],
        "truncated",
    ),
    "count mismatch": (
        lambda r: write_idx(r / IDX_NAMES[1], idx_bytes(np.arange(11))),
        IDX_NAMES[0],
        "12 images, but",
    ),
}


@pytest.mark.parametrize("problem", IDX_PROBLEMS)
def test_bad_idx_refused_names_the_file(tmp_path, problem):
    root = idx_folder(tmp_path / "mnist", gz=False)
    spoil, named, words = IDX_PROBLEMS[problem]
    spoil(root)
    message = refused(DatasetSpec(kind="idx", path=root), ImageParams(size=(6, 5)))
    assert message.startswith(f"{root / named}: " if named else f"{root}: ") and words in message


def test_broken_gzip_refused(tmp_path):
    root = idx_folder(tmp_path / "mnist", gz=True)
    path = root / f"{IDX_NAMES[2]}.gz"
    path.write_bytes(path.read_bytes()[:20])
    message = refused(DatasetSpec(kind="idx", path=root), ImageParams(size=(6, 5)))
    assert message.startswith(f"{path}: not a readable gzip file")


# --- kind npz ----------------------------------------------------------------------------------


def test_npz_uint8_grey_with_string_labels_and_test(tmp_path):
    path = tmp_path / "d.npz"
    x = pixels(0, (6, 8, 8))
    np.savez(path, x=x, y=np.array(["b", "a"] * 3), x_test=x[:2], y_test=np.array(["a", "b"]))
    data = read_images(DatasetSpec(kind="npz", path=path), "source", GREY8)
    check_form(data.pool.x, 6, GREY8)
    check_form(data.test.x, 2, GREY8)
    np.testing.assert_array_equal(data.pool.x[:, 0] * 255, x)
    assert data.pool.y.tolist() == ["b", "a"] * 3
    assert image_files(DatasetSpec(kind="npz", path=path)) == [path]


def test_npz_colour_uint8_to_grey_matches_pillow(tmp_path):
    rgb = pixels(3, (4, 3, 8, 8))  # (N, C, H, W)
    np.savez(tmp_path / "d.npz", x=rgb, y=np.array([1.0, 2.0, 1.0, 2.0]))
    data = read_images(DatasetSpec(kind="npz", path=tmp_path / "d.npz"), "source", GREY8)
    pillow = np.stack(
        [np.asarray(Image.fromarray(im.transpose(1, 2, 0)).convert("L")) for im in rgb]
    )
    np.testing.assert_array_equal(data.pool.x[:, 0] * 255, pillow)
    assert data.pool.y.dtype == np.int64  # integral floats canonicalised as the signal reader does


def test_npz_floats_resized_scrambled_and_subsampled(tmp_path):
    x = np.random.default_rng(0).random((9, 1, 12, 10))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(9) % 3, x_test=x[:3, 0], y_test=np.arange(3))
    spec = DatasetSpec(kind="npz", path=tmp_path / "d.npz", max_per_class=2, scramble_seed=3)
    data = read_images(spec, "source", COLOUR8)
    check_form(data.pool.x, 6, COLOUR8)
    check_form(data.test.x, 3, COLOUR8)
    again = read_images(spec, "source", COLOUR8)
    np.testing.assert_array_equal(data.pool.x, again.pool.x)


NPZ_PROBLEMS = {
    "flat": (dict(x=np.zeros((4, 64), np.uint8)), "'x' must have shape (N, H, W) or (N, C, H, W)"),
    "two channels": (dict(x=np.zeros((4, 2, 8, 8), np.uint8)), "with C 1 or 3"),
    "channels last": (dict(x=np.zeros((4, 8, 8, 3), np.uint8)), "got (4, 8, 8, 3)"),
    "int16": (
        dict(x=np.zeros((4, 8, 8), np.int16)),
        "'x' has dtype int16; store images as uint8 (0-255) or floats in [0, 1]",
    ),
    "above one": (
        dict(x=np.full((4, 8, 8), 2.0)),
        "'x': 256 values outside [0, 1] or NaN (first: 2.0); store images as uint8",
    ),
    "NaN": (
        dict(x=np.full((4, 8, 8), np.nan, np.float32)),
        "'x': 256 values outside [0, 1] or NaN",
    ),
    "length mismatch": (dict(x=np.zeros((5, 8, 8), np.uint8)), "'x' has 5 images but 'y' has 4"),
    "test NaN": (
        dict(x_test=np.full((1, 8, 8), np.nan), y_test=np.array([0])),
        "'x_test': 64 values",
    ),
}


@pytest.mark.parametrize("problem", NPZ_PROBLEMS)
def test_bad_npz_refused_names_the_array(tmp_path, problem):
    arrays, words = NPZ_PROBLEMS[problem]
    path = tmp_path / "d.npz"
    np.savez(path, **({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(4) % 2} | arrays))
    message = refused(DatasetSpec(kind="npz", path=path))
    assert message.startswith(f"{path}: ") and words in message


def test_npz_other_size_refused_names_the_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x=np.zeros((2, 8, 8), np.uint8),
        y=np.arange(2),
        x_test=np.zeros((1, 9, 8), np.uint8),
        y_test=np.arange(1),
    )
    message = refused(
        DatasetSpec(kind="npz", path=path), GREY8.model_copy(update={"resize": False})
    )
    assert (
        message.startswith(f"{path}: 'x_test': images of 9x8") and "image.resize: true" in message
    )


# --- Animal-MNIST ------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("animal_mnist") is None, reason=animal_mnist.INSTALL)
def test_animal_mnist_converts_to_an_npz_that_reads(tmp_path, capsys):
    out = tmp_path / "sub" / "animals.npz"
    assert animal_mnist.main([str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: x (10000, 28, 28) uint8")
    assert [p.name for p in out.parent.iterdir()] == ["animals.npz"]  # no temporary left
    data = read_images(DatasetSpec(kind="npz", path=out), "source", ImageParams())
    check_form(data.pool.x, 10000, ImageParams())
    names, counts = np.unique(data.pool.y, return_counts=True)
    assert names.tolist() == sorted(animal_mnist.CLASSES) and set(counts) == {1000}


def test_animal_mnist_missing_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert animal_mnist.main([str(tmp_path / "a.npz")]) == 1
    assert capsys.readouterr().err.strip().endswith("pip install --no-deps animal-mnist==0.4")
    assert not (tmp_path / "a.npz").exists()


def test_restricted_unpickler_reads_arrays_and_refuses_other_globals(tmp_path):
    array = tmp_path / "array.gz"
    array.write_bytes(gzip.compress(pickle.dumps(np.arange(6, dtype=np.int64).reshape(2, 3))))
    np.testing.assert_array_equal(animal_mnist.load_array(array), [[0, 1, 2], [3, 4, 5]])
    hostile = tmp_path / "hostile.gz"
    hostile.write_bytes(gzip.compress(pickle.dumps(os.system)))  # names posix.system
    with pytest.raises(DataError, match=r"hostile.gz: .*refused posix.system"):
        animal_mnist.load_array(hostile)
