"""Atomic writes: a failure mid-write leaves the previous file whole and no debris."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.workspace import files


def test_a_write_that_fails_halfway_leaves_the_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    files.write_text(path, "old complete content\n")

    class DiskFull(Exception):
        pass

    with pytest.raises(DiskFull), files.atomic_path(path) as tmp:
        tmp.write_text("new half-writ")
        raise DiskFull  # the disk filled up mid-write
    assert path.read_text() == "old complete content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left


def test_os_errors_name_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(files.OutputError, match=rf"{blocker}/out.json: cannot write"):
        files.write_json(blocker / "out.json", {"a": 1})
    with pytest.raises(files.OutputError, match=rf"{blocker}: output folder is not writable"):
        files.check_writable(blocker)


def test_npz_bytes_do_not_depend_on_when_they_were_written(tmp_path: Path) -> None:
    arrays = {"x": np.arange(6.0).reshape(2, 3), "y": np.array([1, 2])}
    files.write_npz(tmp_path / "a.npz", **arrays)
    files.write_npz(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as loaded:
        np.testing.assert_array_equal(loaded["x"], arrays["x"])


def test_prune_removes_only_what_is_not_kept(tmp_path: Path) -> None:
    for name in ("keep.png", "old.png"):
        (tmp_path / name).write_text("")
    (tmp_path / "old_dir").mkdir()
    files.prune(tmp_path, keep={"keep.png"})
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_written_files_get_the_users_umask(tmp_path: Path) -> None:
    # mkstemp makes 0600 files; a user with umask 022 expects 0644, like any tool's output
    out = tmp_path / "out.txt"
    code = f"from tasks.workspace import files; files.write_text({str(out)!r}, 'x')"
    subprocess.run([sys.executable, "-c", code], check=True, preexec_fn=lambda: os.umask(0o022))
    assert out.stat().st_mode & 0o777 == 0o644
