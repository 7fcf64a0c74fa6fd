"""Speech through the same stages: the tiny speech study (its corpora synthesised by Debian's
espeak-ng and flite) through Prefect and `dvc repro` with identical files, synthesis rerun by
DVC when a synthesizer's version changes and only then, and bad sounds and corpora refused as
a user meets them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from tasks.config.params import load_params
from tasks.data.datasets import load_meta
from tests.helpers import (
    REPO,
    digest,
    make_workspace,
    one_line_error,
    results_digest,
    run_command,
    run_state_env,
)

SPEECH_TINY = REPO / "tests" / "params.speech.tiny.yaml"
FLOW = ["python", "-m", "flows.pipeline"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("espeak-ng") and shutil.which("flite")),
        reason="Debian's espeak-ng and flite are not installed (.ci/run installs them)",
    ),
]


@pytest.fixture(scope="module")
def speech_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny speech study, once through the Prefect flow (on a fresh Prefect home) and once
    through `dvc repro`."""
    root = tmp_path_factory.mktemp("speech")
    done = {}
    for name, command in [("prefect", FLOW), ("dvc", ["python", "-m", "dvc", "repro"])]:
        done[name] = make_workspace(root / name, SPEECH_TINY)
        result = run_command(command, cwd=done[name], env=run_state_env(done[name], root / "home"))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return done


def test_both_orchestrators_give_identical_speech_results(speech_runs) -> None:
    prefect, dvc = results_digest(speech_runs["prefect"]), results_digest(speech_runs["dvc"])
    sounds = [name for name in prefect if name.endswith(".wav")]
    params = load_params(SPEECH_TINY)
    corpora = params.synthesis.values()
    assert len(sounds) == sum(len(c.words) * c.per_word for c in corpora)  # every sound
    assert {"data/results/flite.csv", "data/results/scrambled.csv"} <= prefect.keys()
    assert prefect == dvc  # the sounds, spectrograms, checkpoints, results and reports
    table = pd.read_csv(speech_runs["dvc"] / "reports" / "comparison.csv")
    assert set(table["strategy"]) == {"scratch", "linear_probe", "lp_ft"}
    report = (speech_runs["dvc"] / "reports" / "report.md").read_text()
    assert "spoken-word corpus `english` synthesised offline by espeak-ng 1." in report
    assert "spectrogram cells scrambled (seed 7)" in report


def test_prepared_sounds_are_log_mel_spectrograms(speech_runs) -> None:
    workspace = speech_runs["prefect"]
    audio = load_params(SPEECH_TINY).audio
    meta = load_meta(workspace / "data" / "prepared" / "flite")
    assert meta["input_shape"] == [audio.n_mels, audio.frames]  # (C = mel bands, L = frames)
    assert meta["classes"] == ["0", "1", "2"]  # the class folders
    manifest = pd.read_csv(workspace / "data" / "synthesized" / "flite.csv")
    assert set(manifest["voice"]) == {"kal", "slt"}
    # flite's kal speaks at 8 kHz, slt at 16 kHz: `prepare` resampled them to one rate
    rates = {
        soundfile.info(workspace / "data" / "synthesized" / "flite" / file).samplerate
        for file in manifest["file"]
    }
    assert rates == {8000, 16000}
    train = np.load(workspace / "data" / "prepared" / "flite" / "train.npz")
    assert train["x"].dtype == np.float32
    assert np.allclose(train["x"].mean(axis=(1, 2)), 0, atol=1e-4)  # standardised per sound


def test_synthesis_reruns_when_the_synthesizer_changes_and_only_then(
    speech_runs, tmp_path: Path
) -> None:
    """After a run, DVC finds nothing to do but the version probe. With another synthesizer
    version (a dpkg-query on PATH that reports one), it reruns each corpus's synthesis; the
    sounds come out the same, so no pretraining or fine-tuning reruns."""
    workspace = tmp_path / "ws"
    shutil.copytree(speech_runs["dvc"], workspace, symlinks=True)
    status = run_command(["python", "-m", "dvc", "status"], cwd=workspace)
    changed = [line for line in status.stdout.splitlines() if not line.startswith("\t")]
    assert changed == ["synthesizer@english:", "synthesizer@flite:"], status.stdout
    assert status.stdout.count("always changed") == 2

    fake = tmp_path / "bin"
    fake.mkdir()
    # as `dpkg-query -W -f=<package, status, version> <packages>` answers, with a newer version
    newer_dpkg = (
        '#!/bin/sh\nshift 2\nfor p in "$@"; do printf "%s\\tii \\t9.99-newer\\n" "$p"; done\n'
    )
    (fake / "dpkg-query").write_text(newer_dpkg)
    (fake / "dpkg-query").chmod(0o755)
    before = digest(workspace)
    newer = run_command(
        ["python", "-m", "dvc", "repro"], cwd=workspace, env={"PATH": f"{fake}:/usr/bin:/bin"}
    )
    assert newer.returncode == 0, newer.stderr[-2000:]
    assert "Running stage 'synthesize@english'" in newer.stdout
    assert "Running stage 'synthesize@flite'" in newer.stdout
    assert (
        "9.99-newer" in (workspace / "data" / "synthesized" / "english.version.json").read_text()
    )
    after = digest(workspace)
    sounds = [name for name in before if name.endswith(".wav")]
    assert sounds and all(after[name] == before[name] for name in sounds)  # deterministic
    # prepare reads the corpora again (the same spectrograms), and the report names the new
    # version; nothing else reruns
    assert "Running stage 'prepare'" in newer.stdout
    assert "Stage 'pretrain@english' didn't change, skipping" in newer.stdout
    assert "Stage 'finetune@flite' didn't change, skipping" in newer.stdout
    assert "Running stage 'compare'" in newer.stdout


@pytest.mark.parametrize(
    ("edit", "message", "code"),
    [
        (
            "synthesis.english.voices=[m1, nobody]",
            "error: synthesis.english: espeak-ng has no voice 'nobody' (the list: espeak-ng "
            "--voices=variant: f1, f2",
            1,
        ),
        (
            "synthesis.english.words={0: zero, 1: ''}",
            "synthesis.english.words: Value error, label 1: the word is empty",
            2,
        ),
        (
            "targets.flite.corpus=welsh",
            "targets.flite.corpus: 'welsh' is not in synthesis (corpora: english, flite)",
            2,
        ),
    ],
)
def test_bad_corpora_are_refused_in_one_line(
    speech_runs, tmp_path: Path, edit: str, message: str, code: int
) -> None:
    workspace = tmp_path / "ws"
    shutil.copytree(speech_runs["prefect"], workspace, symlinks=True)
    before = digest(workspace)
    result = run_command([*FLOW, "--set", edit], cwd=workspace)
    assert result.returncode == code, result.stderr[-2000:]
    assert message in one_line_error(result) and "Traceback" not in result.stderr
    assert "Starting temporary server" not in result.stderr  # refused before any work
    assert digest(workspace) == before  # nothing lost


def test_a_missing_synthesizer_is_refused_before_any_work(speech_runs, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    shutil.copytree(speech_runs["prefect"], workspace, symlinks=True)
    python = Path(shutil.which("python") or "python").parent
    result = run_command(FLOW, cwd=workspace, env={"PATH": f"{python}:/nonexistent"})
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: espeak-ng is not installed (a speech synthesizer: apt-get install espeak-ng)"
    )
    assert "Starting temporary server" not in result.stderr


def test_a_corrupt_sound_in_a_users_folder_is_named(speech_runs, tmp_path: Path) -> None:
    """A user's folder of WAV files as a target; one corrupt file fails the run in one line
    naming it, before any training, with the earlier results intact."""
    workspace = tmp_path / "ws"
    shutil.copytree(speech_runs["prefect"], workspace, symlinks=True)
    words = workspace / "data" / "raw" / "words"
    shutil.copytree(workspace / "data" / "synthesized" / "flite", words)
    broken = words / "1" / "1_0003.wav"
    broken.write_bytes(broken.read_bytes()[:300])  # cut short
    before = digest(workspace)
    result = run_command(
        [*FLOW, "--set", "targets.mine={kind: audio, path: data/raw/words}"], cwd=workspace
    )
    assert result.returncode == 1, result.stderr[-2000:]
    line = one_line_error(result)
    assert line.startswith(f"error: {broken.relative_to(workspace)}") and "truncated" in line
    assert "Starting temporary server" not in result.stderr
    assert digest(workspace) == before
