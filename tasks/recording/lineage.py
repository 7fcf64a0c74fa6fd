"""Where a number came from: the code commit and the DVC hashes of the files a run read or wrote.

DVC hashes a file output by the md5 of its bytes (that is what dvc.lock holds for
data/checkpoints/backbone.pt and data/results/<target>.csv), so the same md5 of each file a run
reads ties an MLflow run to the exact data and checkpoint versions in dvc.lock.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

COMMIT_TAG, DIRTY_TAG = "git.commit", "git.dirty"
MD5_TAG = "dvc.md5."  # + the file's path relative to the workspace


def git_state(root: Path) -> dict[str, str]:
    """The commit checked out in `root` and whether the tree differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=30
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    if not commit:
        return {COMMIT_TAG: "unknown", DIRTY_TAG: "unknown"}
    return {COMMIT_TAG: commit, DIRTY_TAG: str(bool(dirty)).lower()}


@functools.lru_cache(maxsize=256)
def _md5(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def md5(path: Path) -> str:
    """DVC's hash of a file (md5 of its bytes), cached while the file is unchanged."""
    stat = path.stat()
    return _md5(path.resolve(), stat.st_size, stat.st_mtime_ns)


def input_tags(root: Path, paths: list[Path]) -> dict[str, str]:
    """{"dvc.md5.data/checkpoints/backbone.pt": "<md5>", ...} for the files a run read; a file
    outside the workspace (an encoder's weights where the user keeps them) by its full path."""
    return {f"{MD5_TAG}{_shown(root, path)}": md5(path) for path in paths}


def _shown(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()
