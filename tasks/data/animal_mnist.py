"""Animal-MNIST (PyPI animal-mnist==0.4: 10,000 grey 28x28 animal silhouettes, 10 classes of
1,000) as an .npz that kind npz reads: x (10000, 28, 28) uint8, y the class names.

    python -m tasks.data.animal_mnist OUT.npz

The package ships its arrays as gzipped pickles, which its own loader reads after importing
TensorFlow. Here no module of the package runs (find_spec locates it without importing it), and
the pickles are read by an unpickler that can only rebuild numpy arrays: a pickle that names
anything else is refused instead of run.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.datasets import DataError
from tasks.workspace import files

INSTALL = "pip install --no-deps animal-mnist==0.4"
DATA = Path("data", "Animal_MNIST")  # inside the package's folder
IMAGES = "animal_data_version_3.gz"  # uint8 (10000, 28, 28)
LABELS = "animal_label_version_3.gz"  # int64 (10000,), 0-9
# The package's README lists the classes in this order and names no label's class; label i is
# taken to be the i-th name.
CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
SHAPE = (28, 28)
COUNT = 10_000
# The function numpy's pickles rebuild an array with: numpy._core.multiarray._reconstruct
# (numpy.core before numpy 2), found through an array so as to name no private module here
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global a pickle names (a function it
    would call, a class it would build) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: only numpy arrays are read from this pickle"
            )
        return ALLOWED[module, name]


def load_array(path: Path) -> np.ndarray:
    """One gzipped pickle of one numpy array."""
    try:
        with gzip.open(path) as stream:
            array = ArrayUnpickler(stream).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a gzipped pickle of a numpy array ({err})") from err
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: holds a {type(array).__name__}, not a numpy array")
    return array


def package_data() -> Path | None:
    """The package's data folder, or None when animal_mnist is not installed."""
    spec = importlib.util.find_spec("animal_mnist")  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0], DATA)


def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """x (10000, 28, 28) uint8 and y (10000,) class names, checked."""
    x, labels = load_array(folder / IMAGES), load_array(folder / LABELS)
    if x.dtype != np.uint8 or x.shape != (COUNT, *SHAPE):
        raise DataError(
            f"{folder / IMAGES}: expected uint8 {(COUNT, *SHAPE)}, got {x.dtype} {x.shape}"
        )
    if labels.dtype.kind not in "iu" or labels.shape != (COUNT,):
        raise DataError(
            f"{folder / LABELS}: expected integers ({COUNT},), got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{folder / LABELS}: labels outside 0-{len(CLASSES) - 1}")
    return x, np.array(CLASSES)[labels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Animal-MNIST from its PyPI package as an .npz")
    parser.add_argument("out", type=Path, help="the .npz to write")
    out = parser.parse_args(argv).out
    folder = package_data()
    if folder is None:
        print(f"animal_mnist is not installed: {INSTALL}", file=sys.stderr)
        return 1
    try:
        x, y = load(folder)
        files.write_npz(out, x=x, y=y)  # atomic: a temporary file beside `out`, then os.replace
    except (DataError, files.OutputError) as err:
        print(err, file=sys.stderr)
        return 1
    print(f"wrote {out}: x {x.shape} uint8, y {len(y)} labels of {len(CLASSES)} animal classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
