"""Spoken-word corpora rendered offline by the speech synthesizers of Debian's packages
(espeak-ng, flite): `<out>/<label>/<label>_<i:04d>.wav`, one word per file, 16-bit PCM at the
synthesizer's own sample rate, with a manifest row per file.

The speech study's sources and targets: English digit words from espeak-ng (source), the same
words from flite (near target: another synthesizer, the same words) and another language's
digit words from espeak-ng (far target). A synthesizer says a word the same way every time, so
each utterance draws what varies between real recordings, or a classifier would match
templates instead of learning words:
- the voice (espeak-ng's variants m1, f2, klatt...; flite's kal, awb, rms, slt): speakers;
- the speaking rate: durations and the timing of each sound;
- the pitch: the speaker's f0, which moves the harmonics under the formants;
- white noise at a signal-to-noise ratio: the recording's noise floor;
- a gain: the recording level.
The voices are cycled (each used equally often per word, never correlated with the label); the
rest is drawn uniformly from the spec's ranges by a generator seeded by (seed, corpus name,
label index, utterance index) alone, so an utterance does not depend on the others nor on the
number of workers, and a render is byte-identical on the same synthesizer version."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from tasks.config.params import CorpusSpec
from tasks.data.datasets import DataError

# The Debian packages that shape each synthesizer's sound: its program, its code, its voices
# and dictionaries. installed_version names them all, so that DVC reruns when any changes.
PACKAGES = {
    "espeak-ng": ("espeak-ng", "espeak-ng-data", "libespeak-ng1"),
    "flite": ("flite", "libflite1"),
}
# espeak-ng: -s is in words per minute (its default 175; a variant may scale it by its
# "speed" percent); it takes no less than 80, and above 450 (or above 350 for a voice with fast
# settings) it renders at 175 and time-stretches with libsonic, another sound: rates are kept
# within 80..350 wpm (factors 0.46 to 2).
ESPEAK_WPM = 175
ESPEAK_WPM_RANGE = (80, 350)
# espeak-ng: -p 0..99, default 50, scales the voice's base f0 by pitch_adjust_tab[p] / 128, a
# table "set from y = pow(2, x) * 128, x = -1 to 1" (wavegen.c): factor 2 ** ((p - 50) / 50).
# The intonation's range above the base is not scaled, so a word's median f0 moves less:
# measured, factors 0.8 and 1.25 move it x0.90 and x1.17 (0.7, 1.4: x0.82, x1.30), where
# flite's f0_shift moves it by the factor itself. Widen espeak-ng's pitch range to match.
ESPEAK_PITCH = 50
ESPEAK_PITCH_RANGE = (0, 99)
# flite: awb_time speaks clock times only, so it is left out; a name that flite does not have
# falls back silently to kal (and a path would load a voice file): both refused up front.
FLITE_EXCLUDED = frozenset({"awb_time"})
# flite: duration_stretch is absolute (durations times it); the voices' own, found as the value
# that renders byte-identically to leaving it unset (flite 2.2): the diphone voices 1.1, the
# clustergen voices (awb, rms, slt) 1.0.
FLITE_STRETCH = {"kal": 1.1, "kal16": 1.1}
# flite: rms renders byte-identically whatever its f0 settings (f0_shift, int_f0_target_mean,
# int_f0_target_stddev): its pitch cannot be changed, and its manifest rows say pitch 1.0.
FLITE_FIXED_PITCH = frozenset({"rms"})
# A frame (seconds) whose power is within this many dB of the loudest frame's is speech: the
# signal power of the SNR is measured there, so leading and trailing silence do not count.
FRAME_S = 0.010
ACTIVE_DB = 40.0
PCM_MAX = 32767


@dataclass(frozen=True)
class Utterance:
    """One file to render, with the settings drawn for it (rounded as the manifest says)."""

    label: str
    label_index: int
    index: int
    word: str
    voice: str
    rate: float
    pitch: float
    snr_db: float
    gain_db: float

    @property
    def file(self) -> str:
        return f"{self.label}/{self.label}_{self.index:04d}.wav"


# --- the installed synthesizers ----------------------------------------------------------------


def program(synthesizer: str) -> str:
    """The synthesizer's executable on PATH, or a DataError naming the package to install."""
    if synthesizer not in PACKAGES:
        raise DataError(f"unknown speech synthesizer {synthesizer!r}: espeak-ng or flite")
    path = shutil.which(synthesizer)
    if path is None:
        raise DataError(
            f"{synthesizer} is not installed (a speech synthesizer: apt-get install {synthesizer})"
        )
    return path


def recorded_version(path: Path) -> str:
    """The synthesizer version that stage `synthesizer` wrote to `path` (a corpus's
    <corpus>.version.json: {"synthesizer": ..., "version": ...})."""
    return json.loads(path.read_text())["version"]


def installed_version(synthesizer: str) -> str:
    """The installed versions of the packages that shape the synthesizer's sound, e.g.
    "espeak-ng 1.51+dfsg-10+deb12u2, espeak-ng-data 1.51+dfsg-10+deb12u2, libespeak-ng1 ...";
    without dpkg (or a build that dpkg does not know), the program's own --version line."""
    path = program(synthesizer)
    dpkg = _dpkg_versions(PACKAGES[synthesizer])
    return dpkg if dpkg is not None else _version_line(path)


def _dpkg_versions(packages: Sequence[str]) -> str | None:
    dpkg_query = shutil.which("dpkg-query")
    if dpkg_query is None:
        return None
    # one line per package known to dpkg; "ii": installed (not only its configuration left)
    done = subprocess.run(
        [dpkg_query, "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    found = {}
    for line in done.stdout.splitlines():
        package, status, version = line.split("\t")
        if status.startswith("ii") and version:
            found[package.split(":")[0]] = version
    # the program, built from source, may not come from the packages at all
    if packages[0] not in found:
        return None
    return ", ".join(f"{package} {found[package]}" for package in packages if package in found)


def _version_line(path: str) -> str:
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    # espeak-ng: "eSpeak NG text-to-speech: 1.51  Data at: ..."; flite: its line "version: ..."
    line = next((line for line in lines if "version" in line.lower()), lines[0] if lines else "")
    return " ".join(line.split("Data at:")[0].split()) or f"{Path(path).name} (version unknown)"


def espeak_languages(path: str) -> set[str]:
    """The languages `espeak-ng -v` accepts: each voice's language and its other languages (en
    is only the other language of en-gb, en-us...). A name outside them falls back silently to
    a near one (en-zz speaks en): refused instead."""
    listing = _run([path, "--voices"], "espeak-ng --voices").splitlines()[1:]
    languages = set()
    for line in listing:
        fields = line.split()
        if len(fields) >= 2:
            languages.add(fields[1])
        languages.update(re.findall(r"\(([^\s()]+) \d+\)", line))
    return languages


def espeak_variants(path: str) -> set[str]:
    """The voice variants of `espeak-ng --voices=variant`, by their file name (m1, f2, klatt,
    Annie...), which is what `-v en+<variant>` takes; an unknown one speaks the language's
    default voice without a word of warning: refused instead."""
    listing = _run([path, "--voices=variant"], "espeak-ng --voices=variant").splitlines()[1:]
    found = (re.search(r"\s!v/(.+?)\s*(\([^()]*\))*\s*$", line) for line in listing)
    return {match.group(1) for match in found if match}


def flite_voices(path: str) -> set[str]:
    """flite's voices (`flite -lv`), less those that speak something else than words."""
    listing = _run([path, "-lv"], "flite -lv")
    return set(listing.split(":", 1)[-1].split()) - FLITE_EXCLUDED


def check_spec(spec: CorpusSpec, path: str) -> None:
    """Refuse, in one line naming it, a language or voice the synthesizer does not have: both
    programs would render another voice instead, silently."""
    if spec.synthesizer == "espeak-ng":
        languages = espeak_languages(path)
        if spec.language not in languages:
            raise DataError(
                f"espeak-ng has no language {spec.language!r} (the list: espeak-ng --voices; "
                "e.g. en, en-us, de, es, fr)"
            )
        known, listing = espeak_variants(path), "espeak-ng --voices=variant"
    else:
        known, listing = flite_voices(path), "flite -lv"
    unknown = [voice for voice in spec.voices if voice not in known]
    if unknown:
        # espeak-ng's numbered variants (f1..f5, m1..m8) first, then the named ones
        order = sorted(
            known, key=lambda voice: (not re.fullmatch(r"[fm]\d", voice), voice.lower())
        )
        shown = ", ".join(order[:24])
        raise DataError(
            f"{spec.synthesizer} has no voice {', '.join(map(repr, unknown))} "
            f"(the list: {listing}: {shown}{', ...' if len(known) > 24 else ''})"
        )


def check_corpus(spec: CorpusSpec, key: str) -> None:
    """What the pre-flight check asks of a corpus (params key `key`), in a second: its
    synthesizer is installed and has its language and voices."""
    path = program(spec.synthesizer)
    try:
        check_spec(spec, path)
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


# --- the draws ---------------------------------------------------------------------------------


def utterance_rng(seed: int, name: str, label_index: int, index: int) -> np.random.Generator:
    """The generator of one utterance's draws and noise: its own stream, whatever the others."""
    # the corpus name, so that two corpora with the same seed (source, far target) draw apart
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, name_key, label_index, index])


def draw(spec: CorpusSpec, label_index: int, index: int, rng: np.random.Generator) -> Utterance:
    """One utterance's settings; values rounded first, so that the manifest is what was used."""
    label, word = list(spec.words.items())[label_index]
    # cycled, offset by the label: each voice says each word per_word / len(voices) times
    voice = spec.voices[(label_index + index) % len(spec.voices)]
    rate = round(float(rng.uniform(*spec.rate)), 4)
    pitch = round(float(rng.uniform(*spec.pitch)), 4)
    snr_db = round(float(rng.uniform(*spec.snr_db)), 2)
    gain_db = round(float(rng.uniform(*spec.gain_db)), 2)
    if spec.synthesizer == "flite" and voice in FLITE_FIXED_PITCH:
        pitch = 1.0  # drawn all the same (the stream stays aligned), but this voice ignores it
    return Utterance(str(label), label_index, index, word, voice, rate, pitch, snr_db, gain_db)


# --- the synthesizers' commands ----------------------------------------------------------------


def espeak_wpm(rate: float) -> int:
    """A rate factor as espeak-ng's words per minute (factor 1: its default 175)."""
    return int(np.clip(round(ESPEAK_WPM * rate), *ESPEAK_WPM_RANGE))


def espeak_pitch(pitch: float) -> int:
    """A pitch factor as espeak-ng's -p: the voice's base f0 times 2 ** ((p - 50) / 50), so
    p = 50 + 50 log2(factor), within 0..99 (factors 0.5 to 1.97)."""
    return int(np.clip(round(ESPEAK_PITCH + 50 * math.log2(pitch)), *ESPEAK_PITCH_RANGE))


def espeak_command(path: str, language: str, utt: Utterance, wav: Path) -> list[str]:
    # the word comes on stdin (a word starting with "-" would be an option); -b 1: UTF-8
    return [
        path,
        "-v",
        f"{language}+{utt.voice}",
        "-s",
        str(espeak_wpm(utt.rate)),
        "-p",
        str(espeak_pitch(utt.pitch)),
        "-b",
        "1",
        "-w",
        str(wav),
        "--stdin",
    ]


def flite_command(path: str, utt: Utterance, wav: Path) -> list[str]:
    # durations times duration_stretch: the voice's own divided by the rate
    stretch = FLITE_STRETCH.get(utt.voice, 1.0) / utt.rate
    command = [path, "-voice", utt.voice, "--setf", f"duration_stretch={stretch:.6f}"]
    if utt.voice not in FLITE_FIXED_PITCH:
        # f0_shift multiplies the voice's mean f0: byte-identical to int_f0_target_mean =
        # 95 Hz * factor for kal and kal16 (their 95 Hz); for awb and slt it scales their
        # model's own mean, which flite does not expose
        command += ["--setf", f"f0_shift={utt.pitch:.6f}"]
    return [*command, "-t", utt.word, "-o", str(wav)]


def synthesize(command: list[str], stdin: str | None, wav: Path) -> tuple[np.ndarray, int]:
    """Run one synthesizer command; its WAV as float64 (n,) in [-1, 1], and its sample rate."""
    done = subprocess.run(
        command, input=None if stdin is None else stdin.encode(), capture_output=True, check=False
    )
    if done.returncode != 0 or not wav.is_file():
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(
            f"{Path(command[0]).name} failed ({' '.join(command[1:])}): "
            f"{message[0] if message else f'exit status {done.returncode}'}"
        )
    audio, sample_rate = sf.read(wav, dtype="float64", always_2d=True)
    return audio.mean(axis=1), int(sample_rate)


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DataError(f"{what} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


# --- noise and gain ----------------------------------------------------------------------------


def active_power(audio: np.ndarray, sample_rate: int) -> float:
    """The mean power of audio (n,) over its speech: the 10 ms frames within 40 dB of the
    loudest one. Whole-file power would depend on the silence a synthesizer pads with."""
    frame = max(1, round(FRAME_S * sample_rate))
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)  # (F, frame)
    if len(frames) == 0:
        frames = audio.reshape(1, -1)
    power = (frames**2).mean(axis=1)  # (F,)
    loudest = power.max(initial=0.0)
    if loudest <= 0:
        return 0.0
    return float(power[power >= loudest * 10 ** (-ACTIVE_DB / 10)].mean())


def add_noise(
    audio: np.ndarray, sample_rate: int, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """audio (n,) plus white Gaussian noise (over the whole file, silences included) whose
    power is the speech's (active_power) less snr_db."""
    signal = active_power(audio, sample_rate) if len(audio) else 0.0
    if not signal > 0:  # no samples at all (flite says nothing for "."), or only zeros
        raise DataError("the synthesizer rendered silence")
    sigma = math.sqrt(signal / 10 ** (snr_db / 10))
    return audio + sigma * rng.standard_normal(len(audio))


def apply_gain(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """audio (n,) times the gain, clipped to [-1, 1] as a recorder would clip."""
    return np.clip(audio * 10 ** (gain_db / 20), -1.0, 1.0)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    # rounded here, not by libsndfile, so that the bytes do not depend on its conversion
    return np.round(audio * PCM_MAX).astype(np.int16)


# --- the corpus --------------------------------------------------------------------------------


def render_corpus(spec: CorpusSpec, name: str, out: Path, workers: int) -> list[dict[str, object]]:
    """Render every utterance of the corpus into `out` (existing, empty) as
    `<label>/<label>_<i:04d>.wav`; one manifest row per file, in label then index order:
    file (relative to out), label, word, voice, rate, pitch, snr_db, gain_db, sample_rate."""
    path = program(spec.synthesizer)
    check_spec(spec, path)  # once per corpus, before any utterance
    for label in spec.words:
        (out / str(label)).mkdir(parents=True, exist_ok=True)
    jobs = [
        (label_index, index)
        for label_index in range(len(spec.words))
        for index in range(spec.per_word)
    ]
    with (
        tempfile.TemporaryDirectory(prefix="synthesis-") as scratch,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        # the synthesizer's own WAVs go to scratch: `out` holds only the finished files
        try:
            return list(
                pool.map(lambda job: _render(spec, name, path, out, Path(scratch), *job), jobs)
            )
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failure (or ^C) stops the rest at once
            raise


def _render(
    spec: CorpusSpec, name: str, path: str, out: Path, scratch: Path, label_index: int, index: int
) -> dict[str, object]:
    rng = utterance_rng(spec.seed, name, label_index, index)
    utt = draw(spec, label_index, index, rng)
    wav = scratch / f"{utt.label_index}_{utt.index}.wav"
    if spec.synthesizer == "espeak-ng":
        command, stdin = espeak_command(path, spec.language, utt, wav), utt.word
    else:
        command, stdin = flite_command(path, utt, wav), None
    audio, sample_rate = synthesize(command, stdin, wav)
    wav.unlink()
    try:
        noisy = add_noise(audio, sample_rate, utt.snr_db, rng)  # the same generator: its noise
    except DataError as err:
        raise DataError(f"{utt.file} ({utt.word!r}, voice {utt.voice}): {err}") from None
    pcm = to_pcm16(apply_gain(noisy, utt.gain_db))
    sf.write(out / utt.file, pcm, sample_rate, subtype="PCM_16", format="WAV")
    return {
        "file": utt.file,
        "label": utt.label,
        "word": utt.word,
        "voice": utt.voice,
        "rate": utt.rate,
        "pitch": utt.pitch,
        "snr_db": utt.snr_db,
        "gain_db": utt.gain_db,
        "sample_rate": sample_rate,
    }
