"""Atomic file writes: a reader sees the old file or the new one, never half of either.

A write that fails (disk full, read-only, permissions) raises OutputError naming the file; the
file it would have replaced is left as it was, and no temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# The user's umask, read once at import (reading it means setting it, which threads would race)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputError(OSError):
    """An output that could not be written; the message names the file and the reason."""


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        # mkstemp creates 0600; the file a user finds gets the mode their umask gives new files
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise OutputError(
            f"{path}: cannot write ({err.strerror or err}); the previous version, if any, is "
            "intact"
        ) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def check_writable(*directories: Path) -> None:
    """Create and remove a file in each directory, so that a read-only or full disk is found
    before the expensive work rather than after it."""
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # a unique name (parallel stages probe one folder) and one byte (an empty file
            # needs no space, so it would pass on a full disk)
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check.")
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise OutputError(
                f"{directory}: output folder is not writable ({err.strerror or err}); "
                "nothing was changed"
            ) from err


def prune(directory: Path, keep: set[str]) -> None:
    """Remove the entries of `directory` not named in `keep` (outputs of removed targets)."""
    for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fingerprint(config: Any, paths: Iterable[Path | str]) -> str:
    """sha256 of a JSON-able config and the bytes of files: what a resumable result depends on."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def sha256(path: Path) -> str:
    """The file's sha256 (as `sha256sum` gives it), read in chunks: weights files are large."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_npz(path: Path | str, **arrays: np.ndarray) -> None:
    """Like np.savez, but byte-for-byte reproducible: np.savez stamps the current time into the
    zip, which would give DVC a new hash for the same arrays and rerun everything downstream."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(entry, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def torch_save(path: Path | str, obj: Any) -> None:
    import torch  # here: the modules that only write files should not pay for its import

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
