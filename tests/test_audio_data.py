"""Kind audio: a folder of class folders of .wav and .flac files, read into log-mel spectrograms
(tasks/data/audio.py). The sounds are sine tones written here; every bad input is refused in
one line that names the file."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from tasks.config.params import AudioParams, DatasetSpec
from tasks.data.audio import AUDIO_SUFFIXES, _fit, _input_needed, _waveforms, read_audio
from tasks.data.datasets import DataError

AUDIO = AudioParams()  # 16 kHz, 1 s, 40 mel bands, n_fft 400, hop 160: 101 frames
A, B = 440.0, 880.0  # the tones of classes a and b


def tone(freq: float, rate: int = 16000, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, samples: np.ndarray, rate: int = 16000, subtype: str | None = None) -> Path:
    """Write samples (n,) or (n, channels) as a WAV or FLAC file (by the suffix); 16-bit PCM
    unless `subtype` says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate, subtype=subtype)
    return path


def folder(root: Path, counts: dict[str, int] | None = None) -> Path:
    """root/<class>/<i>.wav: class a holds 440 Hz tones, b 880 Hz, others 300 Hz + 100 Hz * i
    (so that each file of another class differs), `counts[class]` of them."""
    counts = counts or {"a": 2, "b": 2}
    for name, count in counts.items():
        for i in range(count):
            freq = {"a": A, "b": B}.get(name, 300.0 + 100 * i)
            write(root / name / f"{i:02d}.wav", tone(freq, amp=0.2 + 0.1 * i))
    return root


def read(
    root: Path, audio: AudioParams = AUDIO, as_image: bool = False, **spec
) -> tuple[np.ndarray, np.ndarray]:
    data = read_audio(
        DatasetSpec(kind="audio", path=root, **spec), "targets.a", audio, root, as_image
    )
    assert data.test is None
    return data.pool.x, data.pool.y


def refused(root: Path, audio: AudioParams = AUDIO, **spec) -> str:
    with pytest.raises(DataError) as err:
        read(root, audio, **spec)
    message = str(err.value)
    assert "\n" not in message
    return message


def band_of(freq: float, audio: AudioParams = AUDIO) -> int:
    """The mel band whose triangle weighs the STFT bin of `freq` most (torchaudio's filters)."""
    banks = torchaudio.functional.melscale_fbanks(
        audio.n_fft // 2 + 1, 0.0, audio.sample_rate / 2, audio.n_mels, audio.sample_rate
    )  # (freqs, n_mels)
    return int(banks[round(freq * audio.n_fft / audio.sample_rate)].argmax())


# --- the form ----------------------------------------------------------------------------------


def test_series_and_images_of_standardised_log_mels(tmp_path):
    root = folder(tmp_path / "root", {"dog": 2, "cat": 3})
    x, y = read(root)
    assert x.shape == (5, AUDIO.n_mels, AUDIO.frames) and AUDIO.frames == 101
    assert x.dtype == np.float32 and x.flags.c_contiguous
    assert y.dtype.kind == "U" and y.tolist() == ["cat"] * 3 + ["dog"] * 2  # folders, sorted
    np.testing.assert_allclose(x.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(1, 2)), 1, atol=1e-4)
    images, labels = read(root, as_image=True)
    assert images.shape == (5, 1, AUDIO.n_mels, AUDIO.frames) and images.flags.c_contiguous
    np.testing.assert_array_equal(images[:, 0], x)
    assert labels.tolist() == y.tolist()


def test_features_are_torchaudios_log_mel_standardised(tmp_path):
    path = write(tmp_path / "root" / "a" / "x.wav", tone(A) + tone(3000.0, amp=0.1))
    x, _ = read(tmp_path / "root")
    wave = torch.from_numpy(sf.read(path, dtype="float32")[0])
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=40)
    expected = torch.log(mel(wave) + 1e-6)
    expected = (expected - expected.mean()) / (expected.std(correction=0) + 1e-5)
    np.testing.assert_allclose(x[0], expected.numpy(), atol=1e-4)


def test_a_tone_peaks_in_the_mel_band_of_its_frequency(tmp_path):
    x, y = read(folder(tmp_path / "root"))
    assert band_of(A) != band_of(B)
    for row, label in zip(x, y, strict=True):
        assert row.mean(axis=1).argmax() == band_of(A if label == "a" else B)


def test_the_gain_barely_changes_the_features(tmp_path):
    write(tmp_path / "root" / "a" / "loud.wav", tone(A, amp=0.8))
    write(tmp_path / "root" / "a" / "quiet.wav", tone(A, amp=0.1))  # 18 dB lower
    write(tmp_path / "root" / "b" / "other.wav", tone(B, amp=0.8))
    loud, quiet, other = read(tmp_path / "root")[0]
    # not exactly the same: against the floor (mel + 1e-6) a quiet sound's faint cells sink
    assert np.abs(loud - quiet).mean() < 0.05 < 0.5 < np.abs(loud - other).mean()


# --- rates, lengths, channels ------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_another_rate_is_resampled_to_the_same_features(tmp_path, rate):
    write(tmp_path / "root" / "a" / "native.flac", tone(A))
    write(tmp_path / "root" / "a" / "other.wav", tone(A, rate), rate)
    write(tmp_path / "root" / "b" / "native.wav", tone(B))
    x, _ = read(tmp_path / "root")
    native, other, b = x
    assert other.mean(axis=1).argmax() == band_of(A)  # not read as if at 16 kHz (an octave off)
    # up to 3.5 kHz (bands 0-28): above 4 kHz an 8 kHz file has nothing, not even the noise
    # floor of 16-bit samples that the 16 kHz one has
    low, near = slice(0, 29), slice(band_of(A) - 3, band_of(A) + 4)
    assert np.abs(other[near] - native[near]).max() < 0.05
    assert np.abs(other[low] - native[low]).mean() < 0.05
    assert np.abs(b[near] - native[near]).max() > 3 and np.abs(b[low] - native[low]).mean() > 0.5


def test_other_rate_refused_without_resample(tmp_path):
    path = write(tmp_path / "root" / "a" / "x.wav", tone(A, 22050), 22050)
    message = refused(tmp_path / "root", AudioParams(resample=False))
    assert message == (
        f"{path}: sampled at 22050 Hz, audio.sample_rate is 16000; set audio.resample: true to "
        "resample it, or audio.sample_rate"
    )


@pytest.mark.parametrize("rate", [8000, 22050])
def test_resampling_one_batch_equals_each_sound_alone(rate):
    """Sounds of one rate, shorter and longer than a second, resampled as one zero-padded batch
    (the long ones cut first, as `_waveforms` does): each row is its sound resampled alone."""
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-1, 1, round(rate * s)).astype(np.float32) for s in (0.25, 1, 3, 0.999)]
    cut = [wave[: _input_needed(rate, 16000, 16000)] for wave in waves]
    fitted = _fit(cut, rate, 16000, 16000)
    assert fitted.shape == (4, 16000) and fitted.dtype == np.float32
    for row, wave in zip(fitted, waves, strict=True):
        alone = torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000).numpy()
        expected = np.zeros(16000, dtype=np.float32)
        expected[: min(16000, len(alone))] = alone[:16000]
        np.testing.assert_allclose(row, expected, atol=1e-5)


def test_long_sounds_are_cut_and_short_ones_padded_at_the_end(tmp_path):
    long = write(tmp_path / "root" / "a" / "long.wav", tone(A, seconds=2.0))
    short = write(tmp_path / "root" / "a" / "short.wav", tone(A, seconds=0.5))
    waves = _waveforms([long, short], AUDIO)  # (2, samples)
    assert waves.shape == (2, AUDIO.samples)
    np.testing.assert_array_equal(waves[0], sf.read(long, dtype="float32")[0][:16000])
    np.testing.assert_array_equal(waves[1, :8000], sf.read(short, dtype="float32")[0])
    assert not waves[1, 8000:].any()
    x, _ = read(tmp_path / "root")
    assert x.shape == (2, AUDIO.n_mels, AUDIO.frames)
    # frames centred past 0.5 s + half a window hold only the padding: all at the floor, the
    # lowest value; the long tone's frames are all loud
    padded = x[1, :, (8000 + 200) // 160 + 1 :]
    np.testing.assert_allclose(padded, x[1].min(), atol=1e-5)
    assert (x[1, band_of(A), :45] > x[1, band_of(A), 60:].max() + 1).all()
    assert (x[0, band_of(A)] > 1).all()


def test_a_second_rate_with_padding_and_cuts():
    """Sounds shorter and longer than audio.duration at 22050 Hz: resampled, then fitted."""
    short = tone(A, 22050, 0.3)
    long = tone(A, 22050, 1.7)
    fitted = _fit([short, long], 22050, 16000, 16000)
    assert not fitted[0, 4800:].any() and np.abs(fitted[0, :4700]).max() > 0.4
    assert np.abs(fitted[1, -100:]).max() > 0.4


def test_channels_are_averaged(tmp_path):
    stereo = np.stack([tone(A, amp=0.6), tone(B, amp=0.2)], axis=1)  # (samples, 2)
    path = write(tmp_path / "root" / "a" / "stereo.wav", stereo, subtype="FLOAT")
    write(tmp_path / "root" / "a" / "mono.wav", stereo.mean(axis=1), subtype="FLOAT")
    np.testing.assert_allclose(_waveforms([path], AUDIO)[0], stereo.mean(axis=1), atol=1e-7)
    x, _ = read(tmp_path / "root")
    np.testing.assert_allclose(x[0], x[1], atol=1e-4)  # mono.wav, stereo.wav


def test_hidden_entries_are_ignored_and_suffixes_any_case(tmp_path):
    root = tmp_path / "root"
    write(root / "a" / "X.WAV", tone(A))
    write(root / "a" / "y.Flac", tone(A))
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "a" / "._X.WAV").write_bytes(b"junk")
    x, y = read(root)
    assert len(x) == 2 and y.tolist() == ["a", "a"]
    assert AUDIO_SUFFIXES == (".flac", ".wav")


# --- classes, the draw, the scramble -----------------------------------------------------------


def test_max_per_class_is_the_images_draw_and_decodes_only_the_kept(tmp_path):
    root = folder(tmp_path / "root", {"a": 6, "b": 2, "c": 6})
    kept = np.sort(np.random.default_rng([0, 0]).permutation(6)[:3])  # class a: index 0
    whole = tmp_path / "kept"  # the kept files alone, read as they are
    (whole / "a").mkdir(parents=True)
    for i in kept:
        shutil.copy(root / "a" / f"{i:02d}.wav", whole / "a")
    for i in range(6):
        if i not in kept:
            (root / "a" / f"{i:02d}.wav").write_bytes(b"not decoded, not refused")
    x, y = read(root, max_per_class=3)
    again, _ = read(root, max_per_class=3)
    assert y.tolist() == ["a"] * 3 + ["b"] * 2 + ["c"] * 3
    np.testing.assert_array_equal(x, again)
    alone, _ = read(whole)
    np.testing.assert_array_equal(x[:3], alone)


def test_classes_pick_the_folders_decoded(tmp_path):
    """Only the listed classes are decoded: a broken file elsewhere is never read."""
    root = folder(tmp_path / "root", {"a": 2, "b": 3, "c": 1})
    (root / "c" / "00.wav").write_bytes(b"not decoded, not refused")
    _, y = read(root, classes=["b", "a"])
    assert y.tolist() == ["a", "a", "b", "b", "b"]
    message = refused(root, classes=["zebra"])
    assert message.startswith(f"{root}: no class folder is named as in targets.a.classes")


def test_scramble_is_one_fixed_permutation(tmp_path):
    root = folder(tmp_path / "root")
    plain, _ = read(root)
    x, _ = read(root, scramble_seed=5)
    cells = AUDIO.n_mels * AUDIO.frames
    order = np.random.default_rng(5).permutation(cells)
    np.testing.assert_array_equal(x.reshape(4, cells), plain.reshape(4, cells)[:, order])
    assert not np.array_equal(x, plain) and x.flags.c_contiguous
    images, _ = read(root, as_image=True, scramble_seed=5)
    np.testing.assert_array_equal(images[:, 0], x)


# --- refused -----------------------------------------------------------------------------------


def sound_bytes(suffix: str, samples: np.ndarray | None = None, rate: int = 16000) -> bytes:
    """A sound file's bytes (a 440 Hz tone unless `samples`), as written to a .wav or .flac."""
    stream = io.BytesIO()
    sf.write(stream, tone(A) if samples is None else samples, rate, format=suffix[1:].upper())
    return stream.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flac_of_unknown_length() -> bytes:
    """A FLAC as a stream encoder leaves it: STREAMINFO's 36-bit sample count (from byte 21,
    past "fLaC", the block header and 13 bytes of sizes and rates) zero, "unknown"."""
    data = bytearray(sound_bytes(".flac"))
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    return bytes(data)


def late_tone() -> np.ndarray:
    """Silent for 1.25 s, then a tone: nothing to hear in the first audio.duration (1 s)."""
    return np.concatenate([np.zeros(20000, np.float32), tone(A)])


BAD_SOUNDS = {
    "corrupt wav": (
        "x.wav",
        lambda: b"RIFF\x10\x00\x00\x00WAVEfmt junk junk",
        "not a readable audio file (",
    ),
    "truncated wav": (
        "x.wav",
        lambda: half(sound_bytes(".wav")),
        "bytes of samples, the file holds",
    ),
    "wav header only": (
        "x.wav",
        lambda: sound_bytes(".wav")[:44],
        "declares 32000 bytes of samples, the file holds 0: truncated",
    ),
    "truncated flac": (
        "x.flac",
        lambda: half(sound_bytes(".flac")),
        "not a readable audio file (",
    ),
    "text named wav": (
        "x.wav",
        lambda: b"hello, not a sound at all",
        "not a readable audio file (",
    ),
    "flac named wav": (
        "x.wav",
        lambda: sound_bytes(".flac"),
        "a FLAC file, not WAV as its suffix says; rename it to .flac",
    ),
    "wav named flac": (
        "x.flac",
        lambda: sound_bytes(".wav"),
        "a WAV file, not FLAC as its suffix says; rename it to .wav",
    ),
    "mp3": (
        "x.mp3",
        lambda: b"ID3 whatever",
        "not an audio file; a class folder holds only .flac, .wav files",
    ),
    "text file": (
        "notes.txt",
        lambda: b"hi",
        "not an audio file; a class folder holds only .flac, .wav files",
    ),
    "empty file": ("x.wav", lambda: b"", "file is empty"),
    "no frames": (
        "x.wav",
        lambda: sound_bytes(".wav", np.zeros(0, np.float32)),
        "holds no samples (0 frames)",
    ),
    "silence": (
        "x.flac",
        lambda: sound_bytes(".flac", np.zeros(16000, np.float32)),
        "silent (peak |amplitude| 0",
    ),
    "below -80 dBFS": (
        "x.wav",
        lambda: sound_bytes(".wav", tone(A, amp=5e-5)),
        "below 0.0001 = -80 dBFS",
    ),
    "flac of unknown length": (
        "x.flac",
        flac_of_unknown_length,
        "declares no length (a FLAC written to a stream)",
    ),
    "silent for audio.duration": (
        "x.wav",
        lambda: sound_bytes(".wav", late_tone()),
        "silent in its first 1 s (peak |amplitude| 0, below 0.0001 = -80 dBFS): raise "
        "audio.duration",
    ),
    "channels that cancel": (
        "x.wav",
        lambda: sound_bytes(".wav", np.stack([tone(A), -tone(A)], axis=1)),
        "after averaging its 2 channels, below 0.0001 = -80 dBFS",
    ),
}


@pytest.mark.parametrize("problem", BAD_SOUNDS)
def test_bad_sound_refused_names_the_file(tmp_path, problem):
    root = folder(tmp_path / "root")
    name, contents, words = BAD_SOUNDS[problem]
    (root / "b" / name).write_bytes(contents())
    message = refused(root)
    assert message.startswith(f"{root / 'b' / name}: ") and words in message


WAV_VARIANTS = {
    "big-endian RIFX": {"format": "WAV", "endian": "BIG"},
    "RF64 (size in ds64)": {"format": "RF64"},
    "WAVE_FORMAT_EXTENSIBLE": {"format": "WAVEX"},
    "24-bit": {"format": "WAV", "subtype": "PCM_24"},
}


@pytest.mark.parametrize("variant", WAV_VARIANTS)
def test_truncated_wav_variants_refused(tmp_path, variant):
    """libsndfile reads a WAV cut short without a word, its frame count from the file's size:
    the data chunk's declared size tells."""
    stream = io.BytesIO()
    sf.write(stream, np.stack([tone(A), tone(B)], axis=1), 16000, **WAV_VARIANTS[variant])
    whole = write(tmp_path / "root" / "a" / "whole.wav", tone(A))
    whole.write_bytes(stream.getvalue())
    assert read(tmp_path / "root")[0].shape == (1, AUDIO.n_mels, AUDIO.frames)
    cut = tmp_path / "root" / "a" / "cut.wav"
    cut.write_bytes(stream.getvalue()[: len(stream.getvalue()) * 2 // 3])
    assert 0 < sf.info(cut).frames < 16000  # what libsndfile makes of it
    message = refused(tmp_path / "root")
    assert message.startswith(f"{cut}: its header declares ") and message.endswith(": truncated")


def test_a_wav_of_unknown_length_reads_to_its_end(tmp_path):
    """A writer that could not seek back (a pipe) leaves the data size at 0xFFFFFFFF."""
    path = write(tmp_path / "root" / "a" / "x.wav", tone(A))
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    assert _waveforms([path], AUDIO).shape == (1, AUDIO.samples)
    assert np.abs(_waveforms([path], AUDIO)[0, -100:]).max() > 0.4


def test_nan_samples_refused(tmp_path):
    samples = tone(A)
    samples[100] = np.nan
    path = write(tmp_path / "root" / "a" / "x.wav", samples, subtype="FLOAT")
    assert refused(tmp_path / "root") == f"{path}: holds NaN or infinite samples"


FOLDER_PROBLEMS = {
    "empty class": (
        lambda r: (r / "c").mkdir(),
        "c",
        "empty class folder; add its sounds or remove it",
    ),
    "nested folder": (lambda r: (r / "a" / "more").mkdir(), "a/more", "not an audio file"),
    "file at root": (
        lambda r: (r / "labels.csv").write_text("x"),
        "labels.csv",
        "a file beside the class folders of targets.a.path; kind audio reads root/<class name>/<sound>",
    ),
}


@pytest.mark.parametrize("problem", FOLDER_PROBLEMS)
def test_bad_folder_refused_names_the_file(tmp_path, problem):
    root = folder(tmp_path / "root")
    spoil, named, words = FOLDER_PROBLEMS[problem]
    spoil(root)
    message = refused(root)
    assert message.startswith(f"{root / named}: ") and words in message


def test_root_without_class_folders_refused(tmp_path):
    (tmp_path / "root").mkdir()
    message = refused(tmp_path / "root")
    assert message.startswith(f"{tmp_path / 'root'}: no class folders in targets.a.path")


def test_a_corpus_is_named_by_its_setting(tmp_path):
    """A synthesised corpus has no path: the folder is passed, and messages name `corpus`."""
    root = folder(tmp_path / "synthesized" / "words")
    (root / "notes.csv").write_text("x")
    spec = DatasetSpec(kind="audio", corpus="words")
    with pytest.raises(DataError, match=r"beside the class folders of targets\.near\.corpus;"):
        read_audio(spec, "targets.near", AUDIO, root, False)


@pytest.mark.parametrize(
    ("overrides", "shape"),
    [
        ([], (16, 51)),  # a time series: C = mel bands, L = frames
        (
            ["model.backbone=timm", "model.architecture_args={channels: [4, 8, 8, 8]}"],
            (1, 16, 51),  # an image of one channel
        ),
    ],
)
def test_the_backbone_chooses_how_sounds_are_shaped(
    tmp_path: Path, overrides: list[str], shape: tuple[int, ...]
) -> None:
    """A synthesised corpus's shape is known before it is rendered (the pre-flight check reads
    no file of it), and a user's folder reads into the same shape."""
    from tasks.config.params import load_params
    from tasks.data.sources import check_user_data

    tiny = Path(__file__).parent / "params.speech.tiny.yaml"  # 8 kHz, 0.8 s, 16 mels, hop 128
    folder(tmp_path / "words", {"a": 3, "b": 3})
    mine = f"targets.mine={{kind: audio, path: {tmp_path / 'words'}}}"
    params = load_params(tiny, [*overrides, mine])
    shapes = check_user_data(params)
    assert shapes == {"english": shape, "flite": shape, "scrambled": shape, "mine": shape}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("targets.flite.classes=[0, 7]", "classes [7] have no examples"),
        ("synthesis.flite.per_word=2", "flite"),
    ],
)
def test_a_corpus_that_cannot_be_split_is_refused_before_it_is_rendered(
    override: str, named: str
) -> None:
    """The pre-flight check knows a corpus's labels and counts from its params: a class it
    does not speak, or too few sounds to cut the splits, fail now, not after the synthesis."""
    from tasks.config.params import load_params
    from tasks.data.sources import check_user_data

    params = load_params(Path(__file__).parent / "params.speech.tiny.yaml", [override])
    with pytest.raises(DataError, match=r"^targets\.flite \(corpus flite\)") as caught:
        check_user_data(params)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_a_spectrograms_augmentation_is_checked_on_its_shape() -> None:
    """With a timm backbone, a sound is a (1, n_mels, frames) image: an augmentation that does
    not fit it is refused before any work, not at pretraining."""
    from tasks.config.params import ParamsError, load_params
    from tasks.frame import check_image_model

    params = load_params(
        Path(__file__).parent / "params.speech.tiny.yaml",
        [
            "model.backbone=timm",
            "model.architecture_args={channels: [4, 8, 8, 8], layers: [1, 1, 1, 1]}",
            "pretrain.augment=[{RandomCrop: {size: 28}}]",
        ],
    )
    with pytest.raises(ParamsError, match=r"pretrain\.augment"):
        check_image_model(params, (1, params.audio.n_mels, params.audio.frames))
