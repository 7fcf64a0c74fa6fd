"""Sounds, read and checked into one form: log-mel spectrograms, float32, C-contiguous, of shape
(N, n_mels, frames) as time series (C = mel bands, L = frames) or (N, 1, n_mels, frames) as
images, with `audio` (AudioParams) fixing every size; y (N,) the labels as stored. One kind:

- audio: a folder root/<class>/<sound> (flac, wav), a user's or a corpus that stage synthesize
  rendered (data/synthesized/<corpus>); the class folder names are the labels (str); hidden
  entries (.DS_Store) are ignored; decoded with libsndfile (soundfile); no shipped test set.

Order: `classes` and `max_per_class` pick the files first (the images kind's seeded draw,
tasks/data/folders.py), so that only the kept files are decoded. Each is decoded to float32,
its channels averaged to mono, resampled to audio.sample_rate by torchaudio's windowed-sinc
interpolation (files grouped by rate, each group at once), then cut or zero-padded at its end to
audio.duration. Then, in batches, torchaudio's MelSpectrogram (power, centred STFT: a frame per
hop, plus one), log(mel + 1e-6), and a standardisation per example (its mean subtracted, divided
by its std + 1e-5): a sound's gain only shifts its log-mel, so it barely shows. Last,
`scramble_seed`'s one permutation of every spectrogram's (mel band, frame) cells (a control).

Refused, in one line that names the file (and the params key where a setting fixes it): a
file of another suffix, or not of the format its suffix says; a corrupt or truncated file (a
WAV whose data chunk is cut short included: libsndfile reads what is there without a word);
an empty file or one of no samples; NaN or infinite samples; a silent one (peak below 1e-4,
-80 dBFS, after averaging its channels); a file at another rate with audio.resample false; and
the folder layout errors of the images kind.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile

from tasks.config.params import AudioParams, DatasetSpec
from tasks.data.datasets import DataError, Labelled, RawDataset
from tasks.data.folders import FolderLayout, class_files

if TYPE_CHECKING:
    import torch

AUDIO_SUFFIXES = (".flac", ".wav")
FOLDER = FolderLayout(
    AUDIO_SUFFIXES,
    "kind audio reads root/<class name>/<sound> (.flac, .wav)",
    f"not an audio file; a class folder holds only {', '.join(AUDIO_SUFFIXES)} files",
    "sounds",
)
# libsndfile's formats that each suffix may hold: WAVEX is a WAV of WAVE_FORMAT_EXTENSIBLE
# (multichannel, 24-bit), RF64 a WAV beyond 4 GiB
FORMATS = {".wav": ("WAV", "WAVEX", "RF64"), ".flac": ("FLAC",)}
SILENT = 1e-4  # peak |amplitude| (-80 dBFS) below which a sound is silence
UNKNOWN_FRAMES = 2**63 - 1  # what libsndfile declares for a FLAC of unknown length
MEL_FLOOR = 1e-6  # added before the log: silence maps to log(1e-6), not -inf
STD_FLOOR = 1e-5  # added to the std: a flat spectrogram is not blown up
CHUNK = 256  # files decoded and transformed at once: bounds the waveforms held in memory
# Cut before resampling to the samples needed plus this much of the input: the sinc filter
# (6 zero crossings of the lower rate) reaches far less beyond the last sample it makes.
RESAMPLE_MARGIN_S = 0.1


def read_audio(
    spec: DatasetSpec, key: str, audio: AudioParams, path: Path, as_image: bool
) -> RawDataset:
    """The sounds of folder `path` (root/<label>/*.wav|flac) as log-mel spectrograms, float32:
    (N, n_mels, frames), or (N, 1, n_mels, frames) when `as_image`; labels (N,) str, the class
    folder names, sorted. `key`: the dataset's params key, for messages."""
    import torch  # here: listing and checking a folder needs no torch

    field = "path" if spec.path is not None else "corpus"
    files, labels = class_files(path, key, FOLDER, spec.classes, spec.max_per_class, field)
    mel = _mel_transform(audio)
    x = np.empty((len(files), audio.n_mels, audio.frames), dtype=np.float32)
    for start in range(0, len(files), CHUNK):
        waves = _waveforms(files[start : start + CHUNK], audio)  # (n, samples)
        with torch.inference_mode():
            x[start : start + len(waves)] = _features(torch.from_numpy(waves), mel).numpy()
    if spec.scramble_seed is not None:
        order = np.random.default_rng(spec.scramble_seed).permutation(audio.n_mels * audio.frames)
        # np.take keeps the result C-contiguous (fancy indexing on the last axis does not)
        x = np.take(x.reshape(len(x), -1), order, axis=1).reshape(x.shape)
    return RawDataset(Labelled(x[:, None] if as_image else x, labels), None)


# --- waveforms ---------------------------------------------------------------------------------


def _waveforms(files: list[Path], audio: AudioParams) -> np.ndarray:
    """Decode, downmix, resample and fit files -> (n, audio.samples) float32: those of one rate
    are resampled as one batch."""
    waves = np.zeros((len(files), audio.samples), dtype=np.float32)
    decoded: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)  # rate -> (row, wave)
    for row, path in enumerate(files):
        wave, rate = _decode(path, audio)
        needed = _input_needed(rate, audio.sample_rate, audio.samples)
        # a copy of the part used, so that a long file's samples are not held for the chunk
        decoded[rate].append((row, wave[:needed].copy() if len(wave) > needed else wave))
    for rate, members in decoded.items():
        rows = [row for row, _ in members]
        waves[rows] = _fit([wave for _, wave in members], rate, audio.sample_rate, audio.samples)
    return waves


def _fit(waves: list[np.ndarray], rate: int, sample_rate: int, samples: int) -> np.ndarray:
    """Mono waveforms (n_i,) at `rate` -> (n, samples) float32 at `sample_rate`: resampled (as
    one zero-padded batch), then cut or zero-padded at the end. Each row equals its wave
    resampled alone: torchaudio pads with zeros, and each row's tail past its own resampled
    length is set to zero."""
    if rate == sample_rate:
        out = np.zeros((len(waves), samples), dtype=np.float32)
        for row, wave in zip(out, waves, strict=True):
            kept = wave[:samples]
            row[: len(kept)] = kept
        return out
    import torch
    from torchaudio.functional import resample

    width = min(_input_needed(rate, sample_rate, samples), max(len(wave) for wave in waves))
    batch = np.zeros((len(waves), width), dtype=np.float32)  # (n, width) at `rate`
    for row, wave in zip(batch, waves, strict=True):
        kept = wave[:width]
        row[: len(kept)] = kept
    with torch.inference_mode():
        resampled = resample(torch.from_numpy(batch), rate, sample_rate).numpy()
    out = np.zeros((len(waves), samples), dtype=np.float32)
    made = min(samples, resampled.shape[1])
    out[:, :made] = resampled[:, :made]
    for row, wave in zip(out, waves, strict=True):
        # past a sound's own resampled length, ceil(n * new / old) as torchaudio makes it, its
        # row holds the filter's tail into the batch's padding: a sound alone has none there
        row[-(-len(wave) * sample_rate // rate) :] = 0
    return out


def _input_needed(rate: int, sample_rate: int, samples: int) -> int:
    """Samples at `rate` that make the first `samples` at `sample_rate`: all of them, resampled
    or not (the resampling filter's reach, and one cycle of its phases, fit in the margin)."""
    if rate == sample_rate:
        return samples
    step = rate // math.gcd(rate, sample_rate)  # input samples per cycle of the filter's phases
    return -(-samples * rate // sample_rate) + step + math.ceil(RESAMPLE_MARGIN_S * rate)


def _decode(path: Path, audio: AudioParams) -> tuple[np.ndarray, int]:
    """One file -> its mono waveform (frames,) float32 and its sample rate, checked."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        with soundfile.SoundFile(path) as sound:
            _check_header(path, sound, audio)
            declared, rate = sound.frames, sound.samplerate
            samples = sound.read(dtype="float32", always_2d=True)  # (frames, channels)
    except DataError:
        raise
    except (soundfile.SoundFileError, OSError, ValueError, MemoryError) as err:
        raise DataError(f"{path}: not a readable audio file ({_one_line(err)})") from err
    if len(samples) != declared:
        raise DataError(
            f"{path}: the header says {declared} frames, {len(samples)} were decoded: truncated"
        )
    if not np.isfinite(samples).all():
        raise DataError(f"{path}: holds NaN or infinite samples")
    wave = samples.mean(axis=1, dtype=np.float32)  # (frames,): channels averaged
    _check_heard(path, wave, rate, samples.shape[1], audio)
    return wave, rate


def _check_heard(
    path: Path, wave: np.ndarray, rate: int, channels: int, audio: AudioParams
) -> None:
    """Refuse a mono wave (frames,) at `rate` that is silent in the part kept (its first
    audio.duration seconds): it would become a flat spectrogram. Checked after averaging:
    channels in opposite phase cancel."""
    used = wave[: -(-audio.samples * rate // audio.sample_rate)]  # the samples kept, at `rate`
    peak = float(np.abs(used).max())
    if peak >= SILENT:
        return
    averaged = f" after averaging its {channels} channels" if channels > 1 else ""
    later = len(used) < len(wave) and float(np.abs(wave).max()) >= SILENT  # loud past the cut
    where = f" in its first {audio.duration:g} s" if later else ""
    fix = ": raise audio.duration, or trim its leading silence" if later else ""
    raise DataError(
        f"{path}: silent{where} (peak |amplitude| {peak:.2g}{averaged}, below {SILENT:g} = "
        f"-80 dBFS){fix}"
    )


def _check_header(path: Path, sound: soundfile.SoundFile, audio: AudioParams) -> None:
    """Refuse, before decoding: another format than the suffix says, a rate the params refuse,
    a WAV whose data chunk is cut short, no samples."""
    expected = FORMATS[path.suffix.lower()]
    if sound.format not in expected:
        fits = [suffix for suffix, formats in FORMATS.items() if sound.format in formats]
        fix = f"rename it to {fits[0]}" if fits else "convert it to FLAC or WAV"
        raise DataError(
            f"{path}: a {sound.format} file, not {expected[0]} as its suffix says; {fix}"
        )
    if sound.samplerate != audio.sample_rate and not audio.resample:
        raise DataError(
            f"{path}: sampled at {sound.samplerate} Hz, audio.sample_rate is "
            f"{audio.sample_rate}; set audio.resample: true to resample it, or "
            "audio.sample_rate"
        )
    short = _wav_shortfall(path) if sound.format in FORMATS[".wav"] else None
    if short is not None:  # before the count: a WAV cut within its header reads as 0 frames
        raise DataError(
            f"{path}: its header declares {short[0]} bytes of samples, the file holds "
            f"{short[1]}: truncated"
        )
    if sound.frames == 0:
        raise DataError(f"{path}: holds no samples (0 frames)")
    if sound.frames == UNKNOWN_FRAMES:  # libsndfile can neither read nor seek such a file
        raise DataError(
            f"{path}: declares no length (a FLAC written to a stream); re-encode it, e.g. "
            "`flac -d` then `flac`, so that its header holds its length"
        )


def _wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, held) bytes of a WAV's data chunk when the file holds fewer than its header
    declares, else None. libsndfile reads a cut-short data chunk silently, as far as the file
    goes (its frame count, too, comes from the file's size), so the RIFF chunks are walked here:
    RIFF (little-endian), RIFX (big-endian), RF64 (the size in its ds64 chunk). A size of 0 or
    0xFFFFFFFF is a writer's placeholder (a stream that could not seek back): not checked."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(12)
        order = {b"RIFF": "<", b"RIFX": ">", b"RF64": "<"}.get(head[:4])
        if order is None or head[8:12] != b"WAVE":
            return None  # libsndfile read it as a WAV of another header: trust its count
        ds64_data = None
        at = 12
        while at + 8 <= size:
            stream.seek(at)
            chunk, length = struct.unpack(f"{order}4sI", stream.read(8))
            body = stream.read(16) if chunk == b"ds64" else b""
            if len(body) == 16:  # RF64's ds64: riff size, data size (uint64 each), ...
                ds64_data = struct.unpack("<QQ", body)[1]
            if chunk == b"data":
                if head[:4] == b"RF64" and length == 0xFFFFFFFF and ds64_data is not None:
                    length = ds64_data
                held = size - at - 8
                if length in (0, 0xFFFFFFFF) or length <= held:
                    return None
                return length, held
            at += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# --- features ----------------------------------------------------------------------------------


def _mel_transform(audio: AudioParams) -> torch.nn.Module:
    from torchaudio.transforms import MelSpectrogram

    return MelSpectrogram(
        sample_rate=audio.sample_rate,
        n_fft=audio.n_fft,
        hop_length=audio.hop_length,
        n_mels=audio.n_mels,
    )


def _log_mel(waves: torch.Tensor, mel: torch.nn.Module) -> torch.Tensor:
    """(n, samples) float32 -> log-mel (n, n_mels, frames): power mel + 1e-6, its natural log."""
    return (mel(waves) + MEL_FLOOR).log_()


def _features(waves: torch.Tensor, mel: torch.nn.Module) -> torch.Tensor:
    """(n, samples) -> (n, n_mels, frames), each example standardised over all its cells."""
    x = _log_mel(waves, mel)
    mean = x.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    std = x.std(dim=(1, 2), keepdim=True, correction=0)
    return (x - mean) / (std + STD_FLOOR)
