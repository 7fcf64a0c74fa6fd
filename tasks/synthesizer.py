"""Stage `synthesizer`, once per corpus of `synthesis`: the installed version of the corpus's
speech synthesizer, written to data/synthesized/<corpus>.version.json. DVC cannot watch a
program's version, so this stage runs every time (`always_changed`: it takes milliseconds) and
stage `synthesize` depends on its file: a new synthesizer version reruns the synthesis, the same
version leaves it alone."""

from __future__ import annotations

from tasks.config.params import Params
from tasks.data.synthesis import installed_version, recorded_version
from tasks.frame import stage_command
from tasks.recording.recorder import Recorder
from tasks.workspace import files
from tasks.workspace.layout import Layout


def synthesizer(params: Params, corpus: str, layout: Layout, recorder: Recorder) -> str:
    """Write the installed version of `corpus`'s synthesizer (only when it differs from the
    file's, so that an unchanged version leaves the file untouched); return it."""
    spec = params.synthesis[corpus]
    version = installed_version(spec.synthesizer)
    path = layout.synthesizer_version(corpus)
    if not path.is_file() or recorded_version(path) != version:
        files.write_json(path, {"synthesizer": spec.synthesizer, "version": version})
    return version


def main(argv: list[str] | None = None) -> None:
    stage_command(__doc__, synthesizer, argv, per="corpus")


if __name__ == "__main__":
    main()
