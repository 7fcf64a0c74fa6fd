"""Folders of class folders, root/<class>/<file>, as the images and audio kinds read them: the
class folder names are the labels (str), hidden entries (.DS_Store, macOS's ._x.png) are ignored,
and anything else that is not a file of the kind's suffixes is refused in one line that names it.
Also the seeded per-class draw of `max_per_class`, which every kind that bounds its classes
shares, so that a folder decodes only the files it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data.datasets import DataError
from tasks.data.npz import sorted_labels


@dataclass(frozen=True)
class FolderLayout:
    """What a kind's class folders hold, and the words of its messages."""

    suffixes: tuple[str, ...]  # the files a class folder may hold, lower case, with the dot
    layout: str  # the kind's layout, ending every layout message: "kind images reads ..."
    not_ours: str  # why another file is refused: "not an image file; a class folder holds ..."
    contents: str  # what an empty class folder should get: "images"


def class_files(
    root: Path,
    key: str,
    layout: FolderLayout,
    classes: list[int | str] | None,
    most: int | None,
    field: str = "path",
) -> tuple[list[Path], np.ndarray]:
    """The files to decode under root/<class>/ and their class names (N,) str: only the folders
    named in `classes` (matched by their text; all when None), then at most `most` files of each
    class by `per_class_draw`. `key`: the dataset's params key and `field` the setting that
    names root, for messages."""
    files, labels = folder_listing(root, f"{key}.{field}", layout)
    if classes is not None:  # decode the wanted classes only (matched by their text)
        wanted = np.isin(labels, [str(label) for label in classes])
        if not wanted.any():
            raise DataError(
                f"{root}: no class folder is named as in {key}.classes {classes} "
                f"(its folders: {', '.join(sorted(set(labels.tolist()))[:5])}...)"
            )
        files, labels = [f for f, keep in zip(files, wanted, strict=True) if keep], labels[wanted]
    kept = per_class_draw(labels, most)
    return [files[i] for i in kept], labels[kept]


def folder_listing(
    root: Path, setting: str, layout: FolderLayout
) -> tuple[list[Path], np.ndarray]:
    """Every file under root/<class>/ and its class name (N,) str: classes in sorted-label order,
    files by name. `setting`: the params setting that names root ("targets.a.path")."""
    entries = _visible(root)
    for entry in entries:
        if not entry.is_dir():
            raise DataError(
                f"{entry}: a file beside the class folders of {setting}; {layout.layout}"
            )
    if not entries:
        raise DataError(f"{root}: no class folders in {setting}; {layout.layout}")
    by_class = {entry.name: _class_members(entry, layout) for entry in entries}
    order = sorted_labels(np.array(list(by_class), dtype=str))
    files = [path for name in order for path in by_class[name]]
    labels = np.array([name for name in order for _ in by_class[name]], dtype=str)
    return files, labels


def per_class_draw(y: np.ndarray, most: int | None) -> np.ndarray:
    """Sorted indices into y (N,) of at most `most` examples of each class (all when None): per
    class, in sorted-label order, a draw seeded by the class's index in that order."""
    if most is None:
        return np.arange(len(y))
    kept = []
    for index, label in enumerate(sorted_labels(y)):
        members = np.flatnonzero(y == label)
        if len(members) > most:
            draw = np.random.default_rng([0, index]).permutation(len(members))
            members = members[np.sort(draw[:most])]
        kept.append(members)
    return np.sort(np.concatenate(kept))


def _visible(folder: Path) -> list[Path]:
    """A folder's entries by name; hidden ones (.DS_Store, macOS's ._x.png) are not data."""
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def _class_members(folder: Path, layout: FolderLayout) -> list[Path]:
    files = _visible(folder)
    for path in files:
        if path.is_dir() or path.suffix.lower() not in layout.suffixes:
            raise DataError(f"{path}: {layout.not_ours}")
    if not files:
        raise DataError(f"{folder}: empty class folder; add its {layout.contents} or remove it")
    return files
