"""Images, read and checked into one form: x (N, C, H, W) float32 in [0, 1], C-contiguous, with C
and (H, W) set by `image` (ImageParams), and y (N,) the labels as stored. Three kinds:

- images: a folder in torchvision's ImageFolder layout, root/<class>/<image> (png, jpg, jpeg,
  bmp, gif, webp, tif, tiff), decoded with Pillow; the class folder names are the labels (str);
  hidden entries (.DS_Store) are ignored (the listing is kind audio's, too: folders.py); no
  shipped test set.
- idx: a folder of MNIST-style IDX files, optionally gzipped: train-images-idx3-ubyte and
  train-labels-idx1-ubyte are the pool, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (both
  or neither) the shipped test set; labels int64.
- npz: x (N, H, W) or (N, C, H, W) with C 1 or 3, uint8 (0-255) or floats in [0, 1], y (N,),
  and optionally x_test, y_test; labels canonicalised as the signal reader does (npz.py).

Channels: a grey image becomes colour by repeating its one channel 3 times; a colour image
becomes grey by ITU-R 601-2 luma, L = R * 299/1000 + G * 587/1000 + B * 114/1000, as Pillow's
convert("L") computes it (for uint8 arrays with its integer rounding, too). Alpha is dropped
(not composited); palette, CMYK and YCbCr images are converted to RGB first. Grey files of 16
bits (Pillow modes I;16, I) are scaled by 1/65535 and float ones (F) must hold values in [0, 1]:
Pillow's convert("L") would clip both at 255. A multi-frame file (GIF, TIFF) gives its first.

Order: channels, then size (bilinear, antialiased), then `scramble_seed`'s pixel permutation.
`max_per_class` is drawn from the labels first, so that a folder decodes only the kept files
(and `mixed_channels: refuse` checks only those); it bounds a shipped test set too, drawn the
same way (a big test set costs every run's scoring time). Every problem is refused in one line that
names the file, the array where there is one, and the params key where a setting fixes it.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config.params import DatasetSpec, ImageParams
from tasks.data.datasets import DataError, Labelled, RawDataset
from tasks.data.folders import FolderLayout, class_files, per_class_draw
from tasks.data.npz import (
    canonical_labels,
    check_keys,
    check_pairs,
    check_test_labels,
    npz_arrays,
)

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
# Pillow modes of one channel (besides alpha); the 16-bit ones (I;16, I;16B...) start with "I;"
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
FOLDER = FolderLayout(
    IMAGE_SUFFIXES,
    "kind images reads root/<class name>/<image>",
    f"not an image file; a class folder holds only images ({', '.join(IMAGE_SUFFIXES)})",
    "images",
)
ARRAY_FIX = "store images as uint8 (0-255) or floats in [0, 1]"
FILE_FIX = "store 8- or 16-bit images, or floats in [0, 1]"
# (images, labels) file names of each split; each may end in .gz
IDX_PAIRS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # uint8 data (0x08), by number of dimensions


def read_images(spec: DatasetSpec, key: str, image: ImageParams) -> RawDataset:
    """A dataset of kind images, idx or npz (`key`: its params key, for messages), as
    (N, image.channels, *image.size) float32 in [0, 1] with its labels as stored."""
    readers = {"images": _read_folder, "idx": _read_idx_folder, "npz": _read_npz_images}
    raw = readers[spec.kind](spec, key, image)
    if spec.scramble_seed is None:
        return raw
    order = np.random.default_rng(spec.scramble_seed).permutation(math.prod(image.size))
    test = None if raw.test is None else _scramble(raw.test, order)
    return RawDataset(_scramble(raw.pool, order), test)


def image_files(spec: DatasetSpec) -> list[Path]:
    """The files read, for md5 records: an image folder's are too many to list (DVC tracks the
    folder), so none."""
    if spec.kind == "idx":
        found = [_idx_path(spec.path, name) for pair in IDX_PAIRS.values() for name in pair]
        return [path for path in found if path is not None]
    return [spec.path] if spec.kind == "npz" else []


# --- shared: sizes, the scramble -------------------------------------------------------------


def _fit_size(x: np.ndarray, image: ImageParams, where: str) -> np.ndarray:
    """(N, C, h, w) float32 -> (N, C, *image.size), resized, or refused when image.resize is
    false."""
    height, width = x.shape[-2:]
    if (height, width) == tuple(image.size):
        return x
    if not image.resize:
        raise DataError(
            f"{where}: images of {height}x{width} (height x width), image.size is "
            f"{image.size[0]}x{image.size[1]}; set image.resize: true to resize them, or "
            "image.size to their size"
        )
    return _resize(x, image.size)


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, h, w) float32 -> (N, C, *size): bilinear and antialiased, by torchvision's resize
    on float tensors, the one resize for decoded files and arrays alike; clipped to [0, 1]
    against rounding (the filter's weights are non-negative and sum to 1)."""
    import torch  # here: reading images of the right size needs numpy and Pillow alone
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    resized = tvf.resize(
        torch.from_numpy(x), list(size), interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    return np.ascontiguousarray(resized.clamp_(0, 1).numpy())


def _unit_range(where: str, values: np.ndarray, fix: str) -> None:
    """Refuse floats outside [0, 1], NaN included."""
    bad = ~((values >= 0) & (values <= 1))
    if bad.any():
        raise DataError(
            f"{where}: {int(bad.sum())} values outside [0, 1] or NaN (first: "
            f"{values.flat[np.argmax(bad)]}); {fix}"
        )


def _scramble(data: Labelled, order: np.ndarray) -> Labelled:
    """Move pixel order[j] of every image (N, C, H, W) and channel to position j."""
    n, channels, height, width = data.x.shape
    flat = data.x.reshape(n, channels, height * width)
    # np.take keeps the result C-contiguous (fancy indexing on the last axis does not)
    return Labelled(np.take(flat, order, axis=2).reshape(data.x.shape), data.y)


# --- kind images: a folder of class folders ----------------------------------------------------


def _read_folder(spec: DatasetSpec, key: str, image: ImageParams) -> RawDataset:
    files, labels = class_files(spec.path, key, FOLDER, spec.classes, spec.max_per_class)
    return RawDataset(Labelled(_decode_all(files, image), labels), None)


def _decode_all(files: list[Path], image: ImageParams) -> np.ndarray:
    """Decode each file, fit its channels and size -> (N, C, H, W) float32 in [0, 1]."""
    x = np.empty((len(files), image.channels, *image.size), dtype=np.float32)
    first: tuple[Path, int] | None = None  # the first file and its channel count
    for i, path in enumerate(files):
        pixels, channels = _decode(path, image.channels)
        first = first or (path, channels)
        if image.mixed_channels == "refuse" and channels != first[1]:
            raise DataError(
                f"{path}: {_channel_words(channels)}, but {first[0]} has "
                f"{_channel_words(first[1])}; set image.mixed_channels: convert to make them all "
                f"{_channel_words(image.channels)}"
            )
        x[i] = _fit_size(pixels[None], image, str(path))[0]
    return x


def _channel_words(channels: int) -> str:
    return "1 channel (grey)" if channels == 1 else "3 channels (colour)"


def _decode(path: Path, channels: int) -> tuple[np.ndarray, int]:
    """One file -> its pixels (channels, h, w) float32 in [0, 1], and its own channel count."""
    try:
        # Pillow refuses truncated files on load() unless ImageFile.LOAD_TRUNCATED_IMAGES is set
        with Image.open(path) as img:
            img.load()
            own = 1 if img.mode in GREY_MODES or img.mode.startswith("I;") else 3
            values = _grey(path, img) if own == 1 else _colour(img, channels)
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
    except Image.DecompressionBombError as err:  # Pillow's guard: > 2 * MAX_IMAGE_PIXELS
        raise DataError(f"{path}: {err}") from err
    if values.ndim == 3:  # (h, w, 3) colour
        return np.ascontiguousarray(values.transpose(2, 0, 1)), own
    return np.repeat(values[None], channels, axis=0), own


def _grey(path: Path, img: Image.Image) -> np.ndarray:
    """A one-channel image (mode 1, L, LA, I, I;16, F) -> (h, w) float32 in [0, 1]."""
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        _unit_range(str(path), values, FILE_FIX)
        return values
    if img.mode.startswith("I"):  # 16 bits; convert("L") would clip at 255
        values = np.asarray(img).astype(np.float32) / 65535
        _unit_range(str(path), values, FILE_FIX)
        return values
    return np.asarray(img.convert("L"), dtype=np.float32) / 255


def _colour(img: Image.Image, channels: int) -> np.ndarray:
    """A colour image (RGB, RGBA, P, CMYK, YCbCr...) -> (h, w, 3), or (h, w) by Pillow's luma
    when channels is 1; float32 in [0, 1]."""
    rgb = img.convert("RGB")
    return np.asarray(rgb.convert("L") if channels == 1 else rgb, dtype=np.float32) / 255


# --- arrays: kinds idx and npz -----------------------------------------------------------------


def _array_images(where: str, x: np.ndarray, image: ImageParams) -> np.ndarray:
    """x (N, H, W) or (N, C, H, W) with C 1 or 3, uint8 or floats in [0, 1] (checked) ->
    (N, image.channels, *image.size) float32 in [0, 1]."""
    x = x[:, None] if x.ndim == 3 else x
    if x.dtype != np.uint8:  # float16 or float64: the luma in float32, as the models compute
        x = x.astype(np.float32)
    x = _array_channels(x, image.channels)
    floats = x.astype(np.float32)  # a copy, writable for torch, even when x is one already
    if x.dtype == np.uint8:
        floats /= 255
    return _fit_size(floats, image, where)


def _array_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) -> (N, channels, H, W) in x's dtype: grey repeated, or colour's luma."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return np.repeat(x, channels, axis=1)
    red, green, blue = (x[:, i : i + 1] for i in range(3))
    if x.dtype == np.uint8:  # Pillow's convert("L") to the bit: 16-bit weights, rounded
        weighted = red * np.uint32(19595) + green * np.uint32(38470) + blue * np.uint32(7471)
        return ((weighted + np.uint32(0x8000)) >> 16).astype(np.uint8)
    return red * 0.299 + green * 0.587 + blue * 0.114


def _read_idx_folder(spec: DatasetSpec, key: str, image: ImageParams) -> RawDataset:
    images, pool = _idx_split(spec.path, key, "train")
    pool = pool.take(per_class_draw(pool.y, spec.max_per_class))
    x = _array_images(str(images), pool.x, image)
    shipped = _idx_split(spec.path, key, "test")
    if shipped is None:
        return RawDataset(Labelled(x, pool.y), None)
    test_images, test = shipped
    test = test.take(per_class_draw(test.y, spec.max_per_class))
    test_x = _array_images(str(test_images), test.x, image)
    return RawDataset(Labelled(x, pool.y), Labelled(test_x, test.y))


def _idx_path(folder: Path, name: str) -> Path | None:
    """The file `name`, or `name`.gz, in folder; None when neither is there."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _idx_split(folder: Path, key: str, split: str) -> tuple[Path, Labelled] | None:
    """One split's images file and its images (N, H, W) uint8 with labels (N,) int64; None for
    a test split that is not there (the train split is required)."""
    names = IDX_PAIRS[split]
    paths = [_idx_path(folder, name) for name in names]
    if split == "test" and paths == [None, None]:
        return None
    missing = [f"{name}[.gz]" for name, path in zip(names, paths, strict=True) if path is None]
    if missing:
        why = "the test set needs both files" if split == "test" else "the training pool is"
        raise DataError(
            f"{folder}: {' and '.join(missing)} missing in {key}.path; {why} "
            f"{names[0]}[.gz] and {names[1]}[.gz]"
        )
    images_path, labels_path = paths
    images, labels = _idx_array(images_path, 3), _idx_array(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images, but {labels_path} has {len(labels)} labels"
        )
    return images_path, Labelled(images, labels.astype(np.int64))


def _idx_array(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of uint8 data: a big-endian header (magic, then each dimension's size as
    uint32), then the values -> (N,) labels or (N, H, W) images, uint8."""
    raw = _idx_bytes(path)
    what = "images" if ndim == 3 else "labels"
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, less than an IDX {what} header: truncated")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise DataError(
            f"{path}: magic number 0x{magic:08x}, not 0x{IDX_MAGIC[ndim]:08x}: not an IDX file "
            f"of uint8 {what} ({ndim} dimensions)"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    held, expected = len(raw) - header, math.prod(shape)
    if held != expected:
        problem = "truncated" if held < expected else "extra bytes at the end"
        raise DataError(
            f"{path}: the header says {shape} ({expected} bytes of data), the file holds {held}: "
            f"{problem}"
        )
    if expected == 0:
        raise DataError(f"{path}: holds no {what} (shape {shape})")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path) as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from err


def _read_npz_images(spec: DatasetSpec, key: str, image: ImageParams) -> RawDataset:
    path = spec.path
    arrays = npz_arrays(path)
    check_keys(path, arrays)
    pairs = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    for xname, yname in pairs:
        _check_image_arrays(path, arrays[xname], arrays[yname], xname, yname)
    labels = {yname: canonical_labels(path, yname, arrays[yname]) for _, yname in pairs}
    if "y_test" in labels:
        check_test_labels(path, labels["y"], labels["y_test"])
    kept = per_class_draw(labels["y"], spec.max_per_class)
    pool = Labelled(_array_images(f"{path}: 'x'", arrays["x"][kept], image), labels["y"][kept])
    if "x_test" not in arrays:
        return RawDataset(pool, None)
    kept = per_class_draw(labels["y_test"], spec.max_per_class)
    test_x = _array_images(f"{path}: 'x_test'", arrays["x_test"][kept], image)
    return RawDataset(pool, Labelled(test_x, labels["y_test"][kept]))


def _check_image_arrays(path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    """x (N, H, W) or (N, C, H, W), C 1 or 3, uint8 or floats in [0, 1]; y (N,)."""
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] not in (1, 3)):
        raise DataError(
            f"{path}: '{xname}' must have shape (N, H, W) or (N, C, H, W) with C 1 or 3 (channels "
            f"first), got {x.shape}"
        )
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: '{xname}' has shape {x.shape}: images of no pixels")
    check_pairs(path, x, y, xname, yname, "images")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(f"{path}: '{xname}' has dtype {x.dtype}; {ARRAY_FIX}")
    if x.dtype.kind == "f":
        _unit_range(f"{path}: '{xname}'", x, ARRAY_FIX)
