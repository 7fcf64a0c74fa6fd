"""Spoken-word corpora from espeak-ng and flite (tasks/data/synthesis.py): the files and their
manifest, byte-identical renders whatever the workers, settings that change the sound as
drawn, noise at the drawn SNR, and unknown voices, languages and programs refused in one line."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.config.params import CorpusSpec
from tasks.data import synthesis
from tasks.data.datasets import DataError
from tasks.data.synthesis import (
    add_noise,
    apply_gain,
    espeak_pitch,
    espeak_wpm,
    installed_version,
    render_corpus,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install espeak-ng)",
)
needs_flite = pytest.mark.skipif(
    shutil.which("flite") is None, reason="flite is not installed (apt-get install flite)"
)
WORDS = {0: "zero", 1: "one", "two": "two"}  # an int and a str label: folders by str(label)
# per synthesizer: the spec's fields that differ, and a voice whose pitch can be changed
CORPORA = {
    "espeak-ng": ({"voices": ["m1", "f2", "klatt"]}, "m3"),
    "flite": ({"voices": ["kal", "slt", "rms"]}, "slt"),
}
CLEAN = {"snr_db": (200.0, 200.0), "gain_db": (0.0, 0.0)}  # noise far below 16-bit steps


def spec(synthesizer: str, **fields) -> CorpusSpec:
    return CorpusSpec(
        synthesizer=synthesizer, **{"words": WORDS, "per_word": 4, **CORPORA[synthesizer][0]}
    ).model_copy(update=fields)


def render(corpus: CorpusSpec, out: Path, workers: int = 2, name: str = "corpus") -> list[dict]:
    out.mkdir(parents=True)
    return render_corpus(corpus, name, out, workers)


def digests(out: Path) -> dict[str, str]:
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


def read(path: Path) -> tuple[np.ndarray, int]:
    audio, sample_rate = sf.read(path, dtype="float64")
    return audio, sample_rate


def speech_seconds(audio: np.ndarray, sample_rate: int) -> float:
    """From the first to the last 10 ms frame within 40 dB of the loudest."""
    frame = round(0.01 * sample_rate)
    power = (audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1)
    active = np.flatnonzero(power >= power.max() * 1e-4)
    return (active[-1] - active[0] + 1) * 0.01


def median_f0(audio: np.ndarray, sample_rate: int) -> float:
    """The median of the autocorrelation f0 (50-500 Hz) over the loud, periodic 40 ms frames."""
    frame, hop = round(0.04 * sample_rate), round(0.01 * sample_rate)
    starts = range(0, len(audio) - frame, hop)
    power = np.array([(audio[i : i + frame] ** 2).mean() for i in starts])
    f0 = []
    for i, p in zip(starts, power, strict=True):
        if p < 0.1 * power.max():
            continue
        seg = audio[i : i + frame] - audio[i : i + frame].mean()
        ac = np.correlate(seg, seg, "full")[frame - 1 :]
        low, high = sample_rate // 500, sample_rate // 50
        lag = low + int(np.argmax(ac[low:high]))
        if ac[lag] > 0.5 * ac[0]:
            f0.append(sample_rate / lag)
    return float(np.median(f0))


def corpus_measure(corpus: CorpusSpec, out: Path, measure) -> float:
    rows = render(corpus, out)
    return float(np.mean([measure(*read(out / row["file"])) for row in rows]))


# --- without a synthesizer ---------------------------------------------------------------------


@pytest.mark.parametrize("synthesizer", ["espeak-ng", "flite"])
def test_a_missing_program_is_refused_in_one_line(synthesizer, monkeypatch, tmp_path):
    monkeypatch.setattr(synthesis.shutil, "which", lambda name: None)
    message = (
        f"{synthesizer} is not installed (a speech synthesizer: apt-get install {synthesizer})"
    )
    with pytest.raises(DataError) as err:
        installed_version(synthesizer)
    assert str(err.value) == message
    with pytest.raises(DataError) as err:
        render(spec(synthesizer), tmp_path / "out")
    assert str(err.value) == message
    assert list((tmp_path / "out").iterdir()) == []


def test_snr_of_the_added_noise_is_the_drawn_one():
    sample_rate = 16000
    t = np.arange(sample_rate) / sample_rate
    # a second of tone between two of silence: the SNR is over the tone, not the silence
    audio = np.concatenate([np.zeros(sample_rate), 0.5 * np.sin(2 * np.pi * 220 * t)] * 2)
    for snr_db in (0.0, 12.5, 30.0):
        noise = add_noise(audio, sample_rate, snr_db, np.random.default_rng(0)) - audio
        measured = 10 * np.log10(0.125 / np.mean(noise**2))
        assert measured == pytest.approx(snr_db, abs=0.1)
        assert np.std(noise[:sample_rate]) > 0  # over the silences too, as a recording's
    again = add_noise(audio, sample_rate, 12.5, np.random.default_rng(0))
    assert np.array_equal(again, add_noise(audio, sample_rate, 12.5, np.random.default_rng(0)))
    with pytest.raises(DataError, match="silence"):
        add_noise(np.zeros(100), sample_rate, 10.0, np.random.default_rng(0))


def test_gain_scales_then_clips():
    audio = np.array([0.0, 0.1, -0.4, 0.9])
    assert np.allclose(apply_gain(audio, -6.0206), audio / 2)
    assert np.allclose(apply_gain(audio, 0.0), audio)
    assert np.array_equal(apply_gain(audio, 20.0), [0.0, 1.0, -1.0, 1.0])


def test_espeak_mappings_of_rate_and_pitch():
    assert espeak_wpm(1.0) == 175 and espeak_wpm(0.8) == 140 and espeak_wpm(1.25) == 219
    assert espeak_wpm(0.1) == 80 and espeak_wpm(5.0) == 350  # espeak-ng's own range, no sonic
    # -p scales the base f0 by 2 ** ((p - 50) / 50)
    assert espeak_pitch(1.0) == 50 and espeak_pitch(0.5) == 0 and espeak_pitch(2**0.5) == 75
    assert espeak_pitch(4.0) == 99 and espeak_pitch(0.1) == 0


# --- with each synthesizer ---------------------------------------------------------------------

synthesizers = pytest.mark.parametrize(
    "synthesizer",
    [
        pytest.param("espeak-ng", marks=needs_espeak),
        pytest.param("flite", marks=needs_flite),
    ],
)


@synthesizers
def test_installed_version_names_each_package_version(synthesizer, monkeypatch):
    version = installed_version(synthesizer)
    assert "\n" not in version
    if shutil.which("dpkg-query"):
        for package in synthesis.PACKAGES[synthesizer]:
            done = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
            )
            if done.returncode == 0 and done.stdout:
                assert f"{package} {done.stdout}" in version
    # without dpkg: the program's own version line
    which = shutil.which
    monkeypatch.setattr(
        synthesis.shutil, "which", lambda name: None if name == "dpkg-query" else which(name)
    )
    fallback = installed_version(synthesizer)
    assert "\n" not in fallback and any(char.isdigit() for char in fallback)
    assert fallback != version


@synthesizers
def test_files_and_manifest_rows(synthesizer, tmp_path):
    corpus = spec(synthesizer, per_word=6)
    rows = render(corpus, tmp_path / "out")
    labels = [str(label) for label in WORDS]
    expected = [f"{label}/{label}_{i:04d}.wav" for label in labels for i in range(6)]
    assert [row["file"] for row in rows] == expected
    assert sorted(digests(tmp_path / "out")) == sorted(expected)  # nothing else in out
    keys = ["file", "label", "word", "voice", "rate", "pitch", "snr_db", "gain_db"]
    for row in rows:
        assert list(row) == [*keys, "sample_rate"]
        assert row["word"] == {str(label): word for label, word in WORDS.items()}[row["label"]]
        info = sf.info(tmp_path / "out" / row["file"])
        assert (info.samplerate, info.channels, info.subtype) == (row["sample_rate"], 1, "PCM_16")
        assert row["sample_rate"] in ({22050} if synthesizer == "espeak-ng" else {8000, 16000})
        assert corpus.snr_db[0] <= row["snr_db"] <= corpus.snr_db[1]
        assert corpus.gain_db[0] <= row["gain_db"] <= corpus.gain_db[1]
        assert corpus.rate[0] <= row["rate"] <= corpus.rate[1]
        if row["voice"] == "rms":
            assert row["pitch"] == 1.0  # flite's rms ignores pitch: the row says so
        else:
            assert corpus.pitch[0] <= row["pitch"] <= corpus.pitch[1]
    # each voice says each word equally often
    for label in labels:
        voices = [row["voice"] for row in rows if row["label"] == label]
        assert sorted(voices) == sorted(corpus.voices * 2)
    # the draws vary from utterance to utterance
    assert len({(row["rate"], row["pitch"], row["snr_db"], row["gain_db"]) for row in rows}) == 18


@synthesizers
def test_renders_are_byte_identical_whatever_the_workers(synthesizer, tmp_path):
    corpus = spec(synthesizer)
    first = render(corpus, tmp_path / "a", workers=2)
    assert render(corpus, tmp_path / "b", workers=1) == first
    assert render(corpus, tmp_path / "c", workers=3) == first
    assert digests(tmp_path / "a") == digests(tmp_path / "b") == digests(tmp_path / "c")
    # each utterance's draws are its own: more utterances leave the first ones as they were
    render(corpus.model_copy(update={"per_word": 2}), tmp_path / "d")
    fewer = digests(tmp_path / "d")
    assert fewer == {
        file: digest for file, digest in digests(tmp_path / "a").items() if file in fewer
    }
    # another corpus name or seed draws anew
    assert render(corpus, tmp_path / "e", name="other") != first
    assert render(corpus.model_copy(update={"seed": 1}), tmp_path / "f") != first


@synthesizers
def test_unit_rate_and_pitch_render_the_voice_as_it_is(synthesizer, tmp_path):
    """Factor 1 maps to each voice's own settings (espeak-ng 175 wpm and -p 50; flite's own
    duration_stretch, 1.1 for kal): byte-identical to the program run without them."""
    path = shutil.which(synthesizer)
    voices = ["m3", "f2"] if synthesizer == "espeak-ng" else ["kal", "kal16", "awb", "slt", "rms"]
    for voice in voices:
        utt = synthesis.Utterance("1", 1, 0, "seven", voice, 1.0, 1.0, 20.0, 0.0)
        ours, plain = tmp_path / f"{voice}_ours.wav", tmp_path / f"{voice}_plain.wav"
        if synthesizer == "espeak-ng":
            synthesis.synthesize(synthesis.espeak_command(path, "en", utt, ours), "seven", ours)
            subprocess.run([path, "-v", f"en+{voice}", "-w", plain, "seven"], check=True)
        else:
            synthesis.synthesize(synthesis.flite_command(path, utt, ours), None, ours)
            subprocess.run([path, "-voice", voice, "-t", "seven", "-o", plain], check=True)
        assert ours.read_bytes() == plain.read_bytes(), voice


@synthesizers
def test_a_faster_rate_gives_a_shorter_word(synthesizer, tmp_path):
    slow = spec(synthesizer, rate=(0.7, 0.7), **CLEAN)
    fast = spec(synthesizer, rate=(1.4, 1.4), **CLEAN)
    ratio = corpus_measure(slow, tmp_path / "slow", speech_seconds) / corpus_measure(
        fast, tmp_path / "fast", speech_seconds
    )
    assert 1.6 < ratio < 2.4  # 2 were durations exactly inversely proportional


@synthesizers
def test_a_higher_pitch_raises_the_f0(synthesizer, tmp_path):
    voice = CORPORA[synthesizer][1]
    low = spec(synthesizer, voices=[voice], pitch=(0.7, 0.7), **CLEAN)
    high = spec(synthesizer, voices=[voice], pitch=(1.4, 1.4), **CLEAN)
    ratio = corpus_measure(high, tmp_path / "high", median_f0) / corpus_measure(
        low, tmp_path / "low", median_f0
    )
    # flite's f0_shift scales the f0 itself (2); espeak-ng's -p its base only (about 1.6)
    assert ratio > (1.8 if synthesizer == "flite" else 1.4)


@synthesizers
def test_noise_and_gain_in_the_files_are_the_drawn_ones(synthesizer, tmp_path):
    clean = spec(synthesizer, voices=[CORPORA[synthesizer][1]], **CLEAN)
    render(clean, tmp_path / "clean")
    noisy = render(clean.model_copy(update={"snr_db": (15.0, 25.0)}), tmp_path / "noisy")
    quiet = render(clean.model_copy(update={"gain_db": (-12.0, -3.0)}), tmp_path / "quiet")
    for row_noisy, row_quiet in zip(noisy, quiet, strict=True):
        speech, sample_rate = read(tmp_path / "clean" / row_noisy["file"])
        noise = read(tmp_path / "noisy" / row_noisy["file"])[0] - speech
        snr = 10 * np.log10(synthesis.active_power(speech, sample_rate) / np.mean(noise**2))
        assert snr == pytest.approx(row_noisy["snr_db"], abs=0.5)
        gain = np.std(read(tmp_path / "quiet" / row_quiet["file"])[0]) / np.std(speech)
        assert 20 * np.log10(gain) == pytest.approx(row_quiet["gain_db"], abs=0.1)


@pytest.mark.parametrize(
    ("synthesizer", "fields", "named"),
    [
        pytest.param("espeak-ng", {"voices": ["m1", "zzz"]}, "'zzz'", marks=needs_espeak),
        pytest.param("espeak-ng", {"voices": ["alex"]}, "'alex'", marks=needs_espeak),  # Alex
        pytest.param("espeak-ng", {"language": "xx"}, "'xx'", marks=needs_espeak),
        # espeak-ng would speak en for en-zz: refused too
        pytest.param("espeak-ng", {"language": "en-zz"}, "'en-zz'", marks=needs_espeak),
        pytest.param("flite", {"voices": ["kal", "zzz"]}, "'zzz'", marks=needs_flite),
        pytest.param("flite", {"voices": ["awb_time"]}, "'awb_time'", marks=needs_flite),
    ],
)
def test_unknown_voices_and_languages_are_refused_in_one_line(
    synthesizer, fields, named, tmp_path
):
    with pytest.raises(DataError) as err:
        render(spec(synthesizer, **fields), tmp_path / "out")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "out").rglob("*.wav"))


@needs_espeak
def test_another_language_speaks_its_own_words(tmp_path):
    german = spec("espeak-ng", language="de", words={1: "eins", 5: "fünf"}, **CLEAN)
    rows = render(german, tmp_path / "de")
    assert [row["word"] for row in rows[::4]] == ["eins", "fünf"]
    # the umlaut reaches espeak-ng as such: "funf" sounds otherwise
    plain = render(german.model_copy(update={"words": {1: "eins", 5: "funf"}}), tmp_path / "x")
    assert digests(tmp_path / "de")["5/5_0000.wav"] != digests(tmp_path / "x")["5/5_0000.wav"]
    assert rows[0]["sample_rate"] == plain[0]["sample_rate"] == 22050


@pytest.mark.parametrize("audio", [np.zeros(0), np.zeros(800)], ids=["no samples", "zeros"])
def test_silence_gets_no_noise(audio):
    """Noise at an SNR needs a signal: an empty or all-zero rendering is refused."""
    with pytest.raises(DataError, match="rendered silence"):
        add_noise(audio, 16000, 20.0, np.random.default_rng(0))


@needs_flite
def test_a_word_the_synthesizer_says_nothing_for_is_refused_by_name(tmp_path):
    """flite's kal renders no sample at all for "."; the corpus is refused naming the word."""
    silent = spec("flite", voices=["kal"], words={"a": "one", "b": "."}, per_word=1)
    with pytest.raises(DataError, match=r"b/b_0000\.wav \('\.', voice .*rendered silence"):
        render(silent, tmp_path / "out")


def test_the_stage_replaces_a_corpus_whole_or_not_at_all(tmp_path, monkeypatch):
    """Stage synthesize: the corpus folder is replaced once every sound is written; a failure
    midway leaves the previous one as it was, with nothing beside it; corpora no longer in
    params are removed (they would stay in what `prepare` depends on)."""
    from tasks import synthesize as stage
    from tasks.config.params import load_params
    from tasks.recording.recorder import Recorder
    from tasks.workspace import files
    from tasks.workspace.layout import Layout

    params = load_params(Path(__file__).parent / "params.speech.tiny.yaml")
    layout = Layout(tmp_path)
    layout.corpora.mkdir(parents=True)
    (layout.corpora / ".gitkeep").touch()
    (layout.corpora / "removed").mkdir()  # a corpus params no longer name
    (layout.corpora / "removed.csv").write_text("file\n")
    files.write_json(layout.synthesizer_version("english"), {"version": "v1"})

    def render(take: str, fail: bool = False):
        def fake(spec, name, out, workers) -> list[dict[str, object]]:
            for label in spec.words:
                (out / str(label)).mkdir()
                (out / str(label) / "x.wav").write_text(take)
                if fail:
                    raise DataError("the synthesizer failed midway")
            return [{"file": f"{label}/x.wav", "label": str(label)} for label in spec.words]

        monkeypatch.setattr(stage, "render_corpus", fake)

    render("first")
    assert stage.synthesize(params, "english", layout, Recorder()) == 3
    assert sorted(p.name for p in layout.corpora.iterdir()) == [
        ".gitkeep",
        "english",
        "english.csv",
        "english.version.json",
    ]
    before = digests(layout.corpora)
    render("second", fail=True)
    with pytest.raises(DataError, match="midway"):
        stage.synthesize(params, "english", layout, Recorder())
    assert digests(layout.corpora) == before  # the first corpus, whole; no leftovers
    assert sorted(p.name for p in layout.corpora.iterdir())[0] == ".gitkeep"
    render("third")
    stage.synthesize(params, "english", layout, Recorder())
    assert (layout.synthesized("english") / "0" / "x.wav").read_text() == "third"
    assert len(list(layout.corpora.iterdir())) == 4
