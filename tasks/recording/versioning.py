"""DVC as the one judge of what is stale, for the Prefect flow.

Before a stage, the flow asks DVC whether it is up to date (`dvc status` of that stage alone,
which reads the files on disk, so ask once its inputs exist); after it runs, the flow records its
outputs as `dvc repro` would (`dvc commit`: dvc.lock and the cache). All calls come from the flow's
own thread, one at a time: DVC's repo lock does not allow two at once. When a DVC remote is set
as the repo's default (`dvc remote add -d ...`), a run ends with `dvc push`.

The flow is versioned only when it runs what params.yaml says (DVC reads that file): with another
params file or overrides (other than flow.*, which change where work runs, not its results),
every stage runs and nothing is recorded in DVC.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Versioning:
    """The DVC view of one workspace, or a stand-in that runs everything and records nothing.
    One DVC `Repo` serves the whole execution (opening one costs a fraction of a second)."""

    def __init__(self, root: Path, enabled: bool):
        self.root = root
        self.enabled = enabled and self._is_dvc_repo(root)
        self.ran: list[str] = []  # stages run (and recorded), in order
        self.skipped: list[str] = []  # stages DVC found up to date

    @staticmethod
    def _is_dvc_repo(root: Path) -> bool:
        if (root / ".dvc").is_dir():
            return True
        log.warning("%s is not a DVC repository: running every stage, recording none", root)
        return False

    @cached_property
    def _repo(self) -> Any:
        from dvc.repo import Repo  # seconds of import, for versioned runs only

        return Repo(str(self.root))

    def is_stale(self, stage: str) -> bool:
        """Whether DVC would run `stage` now; always True when versioning is off."""
        if not self.enabled:
            return True
        # status and commit take the repo lock and drop DVC's cached view of the files after it
        changes = self._repo.status(targets=[stage], with_deps=False)
        if not changes:
            self.skipped.append(stage)
            log.info("%s is up to date (dvc status): skipped", stage)
        return bool(changes)

    def record(self, stage: str) -> None:
        """Record a stage's fresh outputs in dvc.lock and the DVC cache, as `dvc repro` does."""
        self.ran.append(stage)
        if self.enabled:
            self._repo.commit(stage, force=True)

    def push_if_remote(self) -> bool:
        """`dvc push` to the default remote, if the repo has one; True when it pushed."""
        if not self.enabled:
            return False
        remote = self._repo.config["core"].get("remote")
        if not remote:
            return False
        pushed = self._repo.push()
        log.info("pushed %d files to DVC remote %r", pushed, remote)
        return True

    def close(self) -> None:
        if "_repo" in self.__dict__:
            self._repo.close()
