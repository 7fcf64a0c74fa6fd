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
from pathlib import Path

from dvc.exceptions import NotDvcRepoError
from dvc.repo import Repo

log = logging.getLogger(__name__)


class Versioning:
    """The DVC view of one workspace, or a stand-in that runs everything and records nothing."""

    def __init__(self, root: Path, enabled: bool):
        self.root = root
        self.enabled = enabled and self._is_dvc_repo(root)
        self.ran: list[str] = []  # stages run (and recorded), in order
        self.skipped: list[str] = []  # stages DVC found up to date

    @staticmethod
    def _is_dvc_repo(root: Path) -> bool:
        try:
            Repo(str(root)).close()
        except NotDvcRepoError:
            log.warning("%s is not a DVC repository: running every stage, recording none", root)
            return False
        return True

    def is_stale(self, stage: str) -> bool:
        """Whether DVC would run `stage` now; always True when versioning is off."""
        if not self.enabled:
            return True
        with Repo(str(self.root)) as repo:
            changes = repo.status(targets=[stage], with_deps=False)
        if not changes:
            self.skipped.append(stage)
            log.info("%s is up to date (dvc status): skipped", stage)
        return bool(changes)

    def record(self, stage: str) -> None:
        """Record a stage's fresh outputs in dvc.lock and the DVC cache, as `dvc repro` does."""
        self.ran.append(stage)
        if self.enabled:
            with Repo(str(self.root)) as repo:
                repo.commit(stage, force=True)

    def push_if_remote(self) -> bool:
        """`dvc push` to the default remote, if the repo has one; True when it pushed."""
        if not self.enabled:
            return False
        with Repo(str(self.root)) as repo:
            remote = repo.config["core"].get("remote")
            if not remote:
                return False
            pushed = repo.push()
        log.info("pushed %d files to DVC remote %r", pushed, remote)
        return True
