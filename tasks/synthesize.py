"""Stage `synthesize`, once per corpus of `synthesis`: a spoken-word corpus rendered offline by
a speech synthesizer from Debian's packages (tasks/data/synthesis.py) into an audio folder,
data/synthesized/<corpus>/<label>/*.wav, that a dataset of kind audio reads, with a manifest of
what each sound drew. It depends on the synthesizer's version that stage `synthesizer` writes
(tasks/synthesizer.py), so that DVC reruns it when the synthesizer changes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from tasks.config.params import Params
from tasks.data.synthesis import recorded_version, render_corpus
from tasks.frame import stage_command
from tasks.recording.recorder import Recorder, stage_tags
from tasks.workspace import files
from tasks.workspace.layout import Layout

log = logging.getLogger(__name__)


def synthesize(params: Params, corpus: str, layout: Layout, recorder: Recorder) -> int:
    """Render `corpus` into data/synthesized/<corpus>/ and its manifest; return the sounds
    written. The folder is replaced whole, once every sound is written."""
    spec = params.synthesis[corpus]
    version = recorded_version(layout.synthesizer_version(corpus))
    folder = layout.synthesized(corpus)
    tags = stage_tags("synthesize", corpus=corpus)
    with recorder.child(f"synthesize {corpus}", tags=tags) as stage:
        started = time.perf_counter()
        with _fresh_folder(folder) as out:
            rows = render_corpus(spec, corpus, out, workers=_cores())
        manifest = pd.DataFrame(rows).to_csv(index=False)  # what `folder` holds
        files.write_text(layout.synthesis_manifest(corpus), manifest)
        _prune_removed(params, layout)
        seconds = time.perf_counter() - started
        stage.log(
            params={"synthesizer": spec.synthesizer, "version": version, "sounds": len(rows)},
            metrics={"seconds": seconds},
        )
    log.info("synthesized %s: %d sounds by %s in %.1f s", corpus, len(rows), version, seconds)
    return len(rows)


@contextlib.contextmanager
def _fresh_folder(folder: Path) -> Iterator[Path]:
    """An empty folder beside `folder` that replaces it when the block succeeds; on failure
    the old folder stays as it was and the new one is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield new
        if folder.exists():  # two renames: the old folder is never half replaced
            # named like the new one (.dvcignore's `.*.tmp`): a crash between the renames
            # leaves no folder that DVC or the readers would take for data
            old = new.with_name(new.name.replace(".tmp", ".old.tmp"))
            folder.rename(old)
            new.rename(folder)
            shutil.rmtree(old)
        else:
            new.rename(folder)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _cores() -> int:
    """The cores this process may use (its CPU affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):  # Linux: a container's or taskset's share
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _prune_removed(params: Params, layout: Layout) -> None:
    """Remove the sounds, manifests and versions of corpora no longer in params: they would
    stay in the folder that `prepare` depends on."""
    kept = {
        name
        for corpus in params.synthesis
        for name in (
            layout.synthesized(corpus).name,
            layout.synthesis_manifest(corpus).name,
            layout.synthesizer_version(corpus).name,
        )
    }
    hidden = {entry.name for entry in layout.corpora.iterdir() if entry.name.startswith(".")}
    files.prune(layout.corpora, keep=kept | hidden)  # .gitignore, .gitkeep, writes under way


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, synthesize, argv, per="corpus")


if __name__ == "__main__":
    main()
