"""One pipeline execution per workspace at a time: a second one is refused, not interleaved."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".pipeline.lock"
_HELD: set[Path] = set()  # workspaces this process holds: re-entering is a no-op


class WorkspaceBusy(RuntimeError):
    """Another pipeline execution holds this workspace."""


@contextlib.contextmanager
def workspace_lock(root: Path = Path(".")) -> Iterator[None]:
    """Hold the workspace's lock for the duration, or raise WorkspaceBusy at once.

    An flock is released by the OS when its holder dies, so a crash (even kill -9) never leaves
    a stale lock behind. Re-entrant within a process (the flow's command line takes it to fail
    before Prefect starts; the flow takes it again for runs started by a deployment).
    """
    path = (root / LOCK_FILE).resolve()
    if path in _HELD:
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise WorkspaceBusy(
                f"{path.resolve().parent}: another pipeline execution is running here "
                f"({holder}); wait for it to finish or stop it, then run again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
