"""Typed, frozen params: params.yaml is validated here, before any stage does work.

Every error names the dotted key and the file, on one line, so that a typo in a 40-minute run
costs a second. Stages take these objects, never raw dicts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)
DEFAULT_PARAMS = Path("params.yaml")
Strategy = Literal["scratch", "linear_probe", "finetune", "lp_ft", "partial"]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Seed = Annotated[int, Field(ge=0)]  # numpy seed sequences refuse negative entries
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ParamsError(ValueError):
    """A params document that cannot be used; the message is one line, fit for a user."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class RuntimeParams(_Frozen):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: PositiveInt = 1
    # torch.compile the pretraining model; off by default: on CPU it is slower for these small
    # models (bench/train_step.py: 0.84x); try it on a GPU
    compile: bool = False


class Mnist1dArgs(_Frozen):
    """The published MNIST-1D generator's knobs; defaults are the published values."""

    num_samples: PositiveInt = 5000
    template_len: PositiveInt = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: Annotated[float, Field(ge=0)] = 0.4
    max_translation: PositiveInt = 48
    corr_noise_scale: Annotated[float, Field(ge=0)] = 0.25
    iid_noise_scale: Annotated[float, Field(ge=0)] = 2e-2
    shear_scale: Annotated[float, Field(ge=0)] = 0.75
    shuffle_seq: bool = False
    final_seq_length: PositiveInt = 40
    seed: Seed = 42
    # reference: the published generator's own loop (reproduces the published data exactly);
    # fast: tasks/data/mnist1d_fast.py, the same distribution vectorised (~45x faster at 100k)
    engine: Literal["reference", "fast"] = "reference"


SIGNAL_KINDS = ("mnist1d", "npz")
TEXT_KINDS = ("text", "fortunes")
IMAGE_KINDS = ("images", "idx", "npz")  # npz holds signals or images: the backbone says which
# audio holds log-mel spectrograms, which feed a signal backbone as (C = mel bands, L = frames)
# or an image backbone as (1, mel bands, frames): the backbone says which
AUDIO_KINDS = ("audio",)
TEXT_BACKBONES = ("transformer", "pretrained")
IMAGE_BACKBONES = ("timm",)
# timm constructor args that make the forward pass random (dropout, stochastic depth)
RANDOM_FORWARD_ARGS = frozenset({"drop_rate", "drop_path_rate", "drop_block_rate"})
Modality = Literal["signal", "text", "image"]
FOLDER_KINDS = ("images", "idx", "audio")  # `path` names a folder
FORTUNES_DIR = Path("/usr/share/games/fortunes")  # where Debian's fortunes packages put them


DataKind = Literal["mnist1d", "npz", "text", "fortunes", "images", "idx", "audio"]


class DatasetSpec(_Frozen):
    kind: DataKind
    # labels to keep as stored (ints or strings, matched by their text: 1 matches '1'),
    # relabelled 0..K-1 in this order; null: all, sorted
    classes: list[int | str] | None = None
    generator: Mnist1dArgs | None = None
    path: Path | None = None
    # kind audio: a corpus of `synthesis` (rendered by stage synthesize), in place of `path`
    corpus: str | None = None
    # series of unequal length in one dataset (NaN-padded at the end): refuse them, or stretch
    # each linearly to the dataset's longest (kind npz only)
    unequal_lengths: Literal["refuse", "resample"] = "refuse"
    # kind text: a table (.csv, .parquet, .jsonl) with one text per row; label_column null: no
    # labels (a source for self-supervised pretraining only)
    text_column: str = "text"
    label_column: str | None = "label"
    # kind fortunes: `classes` name files of Debian's fortunes packages under `path` (default
    # /usr/share/games/fortunes), e.g. people, de/witze; each file is a class. At most
    # `max_per_class` fortunes of each are kept (a seeded draw), those longer than
    # `max_chars` are dropped first
    max_per_class: PositiveInt | None = None
    max_chars: PositiveInt | None = None
    # kinds text and fortunes: replace each letter by another, the same throughout (a seeded
    # substitution cipher): the words are gone, the task stays learnable (a control)
    cipher_seed: Seed | None = None
    # images: permute every image's pixels by one seeded permutation, the same for all: the
    # spatial structure is gone, the pixel values stay (a control); audio: the same for the
    # spectrogram's (mel band, frame) cells
    scramble_seed: Seed | None = None

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """What this kind can hold: npz holds signals or images (the backbone decides)."""
        if self.kind in TEXT_KINDS:
            return ("text",)
        if self.kind == "npz" or self.kind in AUDIO_KINDS:
            return ("signal", "image")
        return ("image",) if self.kind in IMAGE_KINDS else ("signal",)

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_not_bool(cls, classes: Any) -> Any:
        # YAML `true` would pass as the int 1; a label is never a bool
        if isinstance(classes, list) and any(isinstance(c, bool) for c in classes):
            raise ValueError("labels are integers or strings, not true/false")
        return classes

    @field_validator("classes")
    @classmethod
    def _classes_nonempty_unique(cls, classes: list[int | str] | None) -> list[int | str] | None:
        if classes is not None and len(classes) == 0:
            raise ValueError("must name at least one class (or be null to keep all)")
        # 1 and '1' name the same stored label
        if classes is not None and len({str(c) for c in classes}) != len(classes):
            raise ValueError("lists a class twice")
        return classes

    @model_validator(mode="after")
    def _kind_matches_fields(self) -> DatasetSpec:
        if self.kind == "joint":  # its members are checked
            return self
        if self.kind == "mnist1d" and self.path is not None:
            raise ValueError("'path' is only for kind npz")
        if self.kind == "mnist1d" and not all(
            isinstance(c, int) and 0 <= c <= 9 for c in self.classes or []
        ):
            raise ValueError(
                f"classes: kind mnist1d has classes 0-9 (integers), got {self.classes}"
            )
        if self.kind != "mnist1d" and self.generator is not None:
            raise ValueError("'generator' is only for kind mnist1d")
        if self.kind in ("npz", "text", "images", "idx") and self.path is None:
            raise ValueError(f"kind {self.kind} needs 'path'")
        if self.kind in AUDIO_KINDS and (self.path is None) == (self.corpus is None):
            raise ValueError(
                "kind audio needs 'path' (a folder root/<label>/*.wav|flac) or 'corpus' (one "
                "of `synthesis`), not both"
            )
        if self.kind == "fortunes" and not self.classes:
            raise ValueError("kind fortunes needs 'classes', its files: e.g. [people, law]")
        only = {  # keys that mean something for some kinds only
            "unequal_lengths": ("npz",),
            "text_column": ("text",),
            "label_column": ("text",),
            "max_per_class": ("fortunes", *IMAGE_KINDS, *AUDIO_KINDS),
            "max_chars": ("fortunes",),
            "cipher_seed": TEXT_KINDS,
            "scramble_seed": (*IMAGE_KINDS, *AUDIO_KINDS),
            "corpus": AUDIO_KINDS,
        }
        for key, kinds in only.items():
            # set to other than its default (a dumped and reloaded spec sets every key)
            moved = getattr(self, key) != type(self).model_fields[key].default
            if moved and self.kind not in kinds:
                raise ValueError(f"'{key}' is only for kind {' or '.join(kinds)}")
        return self

    @property
    def fortunes_dir(self) -> Path:
        return self.path or FORTUNES_DIR

    @property
    def generator_args(self) -> Mnist1dArgs:
        return self.generator or Mnist1dArgs()


Objective = Literal["supervised", "contrastive", "mlm"]


class SourceSpec(DatasetSpec):
    """A pretraining dataset: a dataset of any kind, or (kind joint) the union of other sources,
    each member's classes kept apart; pretrained with its own objective or pretrain.objective."""

    kind: Literal[DataKind, "joint"]
    # joint: the names of the sources whose union it pretrains on
    of: list[str] | None = None
    # supervised (its labels), contrastive (SimCLR on two augmented views: no labels needed),
    # mlm (texts); null: pretrain.objective
    objective: Objective | None = None

    @model_validator(mode="after")
    def _joint_fields(self) -> SourceSpec:
        if self.kind == "joint" and (self.of is None or len(set(self.of)) < 2):
            raise ValueError("kind joint needs 'of': two or more source names")
        if self.kind != "joint" and self.of is not None:
            raise ValueError("'of' is only for kind joint")
        if self.kind == "joint" and self.classes is not None:
            raise ValueError("kind joint keeps each member's classes: 'classes' is not for it")
        if self.kind == "joint":
            data_keys = set(DatasetSpec.model_fields) - {"kind", "classes"}
            moved = sorted(k for k in data_keys & self.model_fields_set)
            if moved:
                raise ValueError(f"'{moved[0]}' is not for kind joint (its members hold the data)")
        return self

    def objective_or(self, default: Objective) -> Objective:
        return self.objective or default


class SplitParams(_Frozen):
    val: Annotated[float, Field(gt=0, lt=1)] = 0.15
    test: Annotated[float, Field(gt=0, lt=1)] = 0.15
    seed: Seed = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitParams:
        if self.val + self.test >= 1:
            raise ValueError("val + test must be below 1, to leave a training split")
        return self


class ModelParams(_Frozen):
    # signals: cnn1d, mlp; text: transformer (ours, pretrained here) or pretrained (a Hugging
    # Face encoder from the directory `pretrained_path`, used in place of pretraining); images:
    # timm (the timm architecture `architecture`, built with `architecture_args`)
    backbone: Literal["cnn1d", "mlp", "transformer", "pretrained", "timm"] = "cnn1d"
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 32, 32])
    kernel_size: PositiveInt = 5
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 256])
    # transformer: width, encoder layers, attention heads, feed-forward width
    width: PositiveInt = 128
    layers: PositiveInt = 4
    heads: PositiveInt = 4
    ff_width: PositiveInt = 256
    # timm: a model name of timm.list_models() (ResNets are tested; layer types without a
    # seeded init are refused by name), and keyword args of its constructor, e.g.
    # {channels: [16, 32, 64, 128]} for a narrow ResNet
    architecture: str = "resnet18"
    architecture_args: dict[str, Any] = Field(default_factory=dict)
    # pretrained: the Hugging Face encoder's directory; timm: a weights file for `architecture`
    # (.safetensors, .pth, .bin: timm's or torchvision's), used in place of pretraining
    pretrained_path: Path | None = None

    @model_validator(mode="after")
    def _backbone_fields(self) -> ModelParams:
        if self.backbone == "pretrained" and self.pretrained_path is None:
            raise ValueError("model.backbone pretrained needs model.pretrained_path")
        if self.backbone not in ("pretrained", "timm") and self.pretrained_path is not None:
            raise ValueError("model.pretrained_path is only for model.backbone pretrained or timm")
        default = type(self).model_fields["architecture"].default
        if self.backbone != "timm" and (self.architecture != default or self.architecture_args):
            raise ValueError("model.architecture and architecture_args are only for backbone timm")
        random = sorted(RANDOM_FORWARD_ARGS & set(self.architecture_args))
        if random:
            raise ValueError(
                f"model.architecture_args: {', '.join(random)} draw at random in every forward "
                "pass from torch's process-wide generator, which the flow's threads share: "
                "results would not repeat"
            )
        if self.backbone == "transformer" and self.width % self.heads:
            raise ValueError(f"model.width ({self.width}) must be a multiple of model.heads")
        return self

    @property
    def modality(self) -> Modality:
        if self.backbone in TEXT_BACKBONES:
            return "text"
        return "image" if self.backbone in IMAGE_BACKBONES else "signal"

    @property
    def depth(self) -> int | None:
        """The backbone's blocks, counted from the input (what `partial` freezes a prefix of);
        None for a pretrained encoder or a timm model: its config or architecture says
        (checked by `load_params`)."""
        if self.backbone == "cnn1d":
            return len(self.channels)
        if self.backbone == "mlp":
            return len(self.hidden)
        return self.layers if self.backbone == "transformer" else None


class TextParams(_Frozen):
    """How texts become token ids in `prepare` (text kinds only)."""

    # BPE, trained on the source's training texts with Hugging Face tokenizers; with
    # model.backbone pretrained, the encoder's own tokenizer is used instead. WordPiece is not
    # offered: its trainer gives another vocabulary in each process (huggingface/tokenizers
    # #1794, open), so the same params would not give the same numbers
    tokenizer: Literal["bpe"] = "bpe"
    vocab_size: Annotated[int, Field(ge=100)] = 4000
    max_tokens: Annotated[int, Field(ge=4, le=512)] = 64  # longer texts are truncated
    lowercase: bool = True


class ImageParams(_Frozen):
    """What every image becomes in `prepare` (image kinds only): (channels, *size) floats in
    [0, 1], cached in data/prepared so that no later stage decodes an image again."""

    size: tuple[PositiveInt, PositiveInt] = (28, 28)  # (height, width)
    # 1: grey, 3: colour. Grey images feed a colour backbone with their one channel repeated
    # 3 times; colour images become grey by ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B,
    # Pillow's convert("L")); alpha is dropped
    channels: Literal[1, 3] = 1
    # images of another size: resize them (bilinear, antialiased), or refuse them
    resize: bool = True
    # an image folder holding grey and colour images: convert them all (the rule above), or
    # refuse the folder
    mixed_channels: Literal["convert", "refuse"] = "convert"


class AudioParams(_Frozen):
    """What every sound becomes in `prepare` (kind audio only): a mono waveform at sample_rate,
    cut or zero-padded at its end to `duration`, then a log-mel spectrogram (torchaudio's
    MelSpectrogram; n_mels bands x frames), cached in data/prepared."""

    sample_rate: PositiveInt = 16000  # Hz
    duration: PositiveFloat = 1.0  # seconds: longer sounds are cut, shorter ones padded
    # files at another rate: resample them (torchaudio's sinc interpolation), or refuse them
    resample: bool = True
    n_mels: PositiveInt = 40  # mel bands: the signal backbone's channels
    n_fft: PositiveInt = 400  # STFT window, in samples (25 ms at 16 kHz)
    hop_length: PositiveInt = 160  # samples between frames (10 ms at 16 kHz)

    @property
    def samples(self) -> int:
        return round(self.sample_rate * self.duration)

    @property
    def frames(self) -> int:
        """Spectrogram frames of one sound (the STFT is centred: one frame per hop, plus one)."""
        return self.samples // self.hop_length + 1

    @model_validator(mode="after")
    def _fits(self) -> AudioParams:
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(
                f"audio.n_mels ({self.n_mels}) exceeds the {self.n_fft // 2 + 1} frequency bins "
                f"of audio.n_fft {self.n_fft}"
            )
        if self.samples < self.n_fft:
            raise ValueError("audio.duration is shorter than one audio.n_fft window")
        return self


Synthesizer = Literal["espeak-ng", "flite"]
Range = tuple[float, float]


class CorpusSpec(_Frozen):
    """A spoken-word corpus that stage `synthesize` renders offline with a speech synthesizer
    from Debian's packages into data/synthesized/<name>/<label>/*.wav (tasks/data/synthesis.py).
    Each utterance draws its voice, rate, pitch, noise and gain from these ranges, by `seed`."""

    synthesizer: Synthesizer
    # espeak-ng: a language of `espeak-ng --voices` (en, de, es, fr...); flite speaks English
    language: str = "en"
    # espeak-ng: voice variants of `espeak-ng --voices=variant` (m1, f2, klatt...); flite: its
    # voices (`flite -lv`: kal, kal16, awb, rms, slt)
    voices: list[str]
    words: dict[int | str, str]  # each label (its class folder) and the word spoken for it
    per_word: PositiveInt = 50  # utterances of each word
    rate: Range = (0.8, 1.25)  # speaking rate, as a factor of the voice's own
    pitch: Range = (0.8, 1.25)  # pitch, as a factor of the voice's own
    snr_db: Range = (10.0, 30.0)  # white noise at this signal-to-noise ratio (dB)
    gain_db: Range = (-12.0, 0.0)  # then this gain (dB)
    seed: Seed = 0

    @field_validator("voices")
    @classmethod
    def _voices(cls, voices: list[str]) -> list[str]:
        if not voices or len(set(voices)) != len(voices):
            raise ValueError("must name one or more voices, each once")
        return voices

    @field_validator("words")
    @classmethod
    def _words(cls, words: dict[int | str, str]) -> dict[int | str, str]:
        if len(words) < 2:
            raise ValueError("must name two or more labels with their words")
        for label, word in words.items():
            if isinstance(label, bool) or not TARGET_NAME.fullmatch(str(label)):
                raise ValueError(f"label {label!r} must be a folder name: A-Z a-z 0-9 _ -")
            if not word.strip():
                raise ValueError(f"label {label!r}: the word is empty")
        if len({str(label) for label in words}) != len(words):
            raise ValueError("lists a label twice")
        return words

    @model_validator(mode="after")
    def _ranges(self) -> CorpusSpec:
        for key in ("rate", "pitch", "snr_db", "gain_db"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"{key}: [low, high] with low <= high (got [{low}, {high}])")
        for key in ("rate", "pitch"):
            if getattr(self, key)[0] <= 0:
                raise ValueError(f"{key}: factors above 0")
        if self.synthesizer == "flite" and self.language != "en":
            raise ValueError("flite speaks English only (language: en); use espeak-ng")
        return self


# An augmentation: one torchvision.transforms.v2 class by name, with its keyword args, e.g.
# {RandomCrop: {size: 28, padding: 2}}; applied to each training image, never to val or test
Augmentation = dict[str, dict[str, Any]]


class TrainParams(_Frozen):
    """The knobs of one supervised training run; shared by pretraining and fine-tuning."""

    max_epochs: PositiveInt = 50
    patience: PositiveInt = 5
    batch_size: PositiveInt = 128
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    # images: torchvision.transforms.v2 transforms of each training image, in order (the same
    # for every strategy); checked when params load
    augment: list[Augmentation] = Field(default_factory=list)

    @field_validator("augment")
    @classmethod
    def _one_transform_each(cls, augment: list[Augmentation]) -> list[Augmentation]:
        for i, step in enumerate(augment):
            if len(step) != 1:
                raise ValueError(
                    f"entry {i}: name one transform with its args, e.g. "
                    "{RandomCrop: {size: 28, padding: 2}}"
                )
        return augment


class PretrainParams(TrainParams):
    # supervised: on the source's labels; contrastive: SimCLR's NT-Xent on two augmented views
    # of each example (tasks/learning/contrastive.py), no labels; mlm: masked-language
    # modelling on its texts (the BERT recipe: mask_prob of the tokens, 80% [MASK], 10% random,
    # 10% kept), transformer only. A source may set its own (sources.<name>.objective)
    objective: Objective = "supervised"
    mask_prob: Annotated[float, Field(gt=0, lt=1)] = 0.15
    # contrastive: the softmax temperature of NT-Xent (SimCLR: 0.1-0.5; TF-C uses 0.2), and
    # the output width of the projector (a 2-layer MLP dropped after pretraining)
    temperature: PositiveFloat = 0.2
    projection_dim: PositiveInt = 128
    lr: PositiveFloat = 3e-3
    seed: Seed = 0
    # > 1: the stage runs itself under torchrun as this many data-parallel processes
    # (tasks/learning/distributed.py); batch_size stays the global batch, split over them
    processes: PositiveInt = 1


class ExtractParams(_Frozen):
    batch_size: PositiveInt = 1024


class FinetuneParams(TrainParams):
    strategies: list[Strategy] = Field(default_factory=lambda: ["scratch", "linear_probe"])
    # label budgets: shares of a target's training split, and labels per class (few-shot)
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [1.0])
    shots: list[PositiveInt] = Field(default_factory=list)
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    lrs: list[PositiveFloat] = Field(default_factory=lambda: [3e-3])
    backbone_lr_scale: PositiveFloat = 0.1
    # layer-wise learning-rate decay: a backbone block's rate is multiplied by layer_decay per
    # block down from the head (1: off); transformer embeddings count as the lowest block
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    freeze_blocks: PositiveInt = 1
    probe_l2: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [1e-3])

    @field_validator("strategies", "seeds", "lrs", "probe_l2")
    @classmethod
    def _nonempty(cls, values: list[Any]) -> list[Any]:
        if not values:
            raise ValueError("must not be empty")
        return values

    @field_validator("strategies", "fractions", "shots", "seeds", "lrs", "probe_l2")
    @classmethod
    def _unique(cls, values: list[Any]) -> list[Any]:
        if len(set(values)) != len(values):
            raise ValueError("lists a value twice")
        return values

    @model_validator(mode="after")
    def _has_a_budget(self) -> FinetuneParams:
        if not self.fractions and not self.shots:
            raise ValueError("finetune needs at least one label budget in fractions or shots")
        return self

    def check_partial(self, blocks: int) -> None:
        """`partial` must leave a block of the backbone's `blocks` to train."""
        if "partial" in self.strategies and self.freeze_blocks >= blocks:
            raise ValueError(
                f"finetune.freeze_blocks ({self.freeze_blocks}) must be below the number of "
                f"backbone blocks ({blocks}), or 'partial' trains no block"
            )

    @field_validator("strategies")
    @classmethod
    def _needs_baseline(cls, strategies: list[str]) -> list[str]:
        if "scratch" not in strategies or len(strategies) < 2:
            raise ValueError(
                "must include 'scratch' (every transfer result is paired with it) and at least "
                "one transfer strategy"
            )
        return strategies


class FlowParams(_Frozen):
    """Prefect only: no stage's output depends on these, so DVC does not track them."""

    retries: Annotated[int, Field(ge=0)] = 2
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 5.0
    deployment: str = "transfer-study"
    cron: str | None = None
    # where the fine-tuning groups run (flows/runners.py): threads of the flow's process, or
    # Dask workers (an existing cluster at dask_address, else a LocalCluster of `workers`)
    task_runner: Literal["threads", "dask"] = "threads"
    workers: PositiveInt = 2
    dask_address: str | None = None


class ParamsOrigin(_Frozen):
    """Where a Params came from: the file, its content's hash and the command line's overrides.
    Not part of the study: it names the execution in its report."""

    path: str
    sha256: str
    overrides: tuple[str, ...] = ()


class Params(_Frozen):
    experiment: str = "transfer-study"
    registered_model: str = "transfer-study-backbone"
    runtime: RuntimeParams = RuntimeParams()
    # the pretraining datasets by name: each is pretrained on its own (and `joint` ones on a
    # union), and every target is fine-tuned from each
    sources: dict[str, SourceSpec]
    targets: dict[str, DatasetSpec]
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    text: TextParams = TextParams()
    image: ImageParams = ImageParams()
    audio: AudioParams = AudioParams()
    # spoken-word corpora rendered offline by stage synthesize, by name; a dataset of kind
    # audio reads one by `corpus: <name>`
    synthesis: dict[str, CorpusSpec] = Field(default_factory=dict)
    pretrain: PretrainParams = PretrainParams()
    extract: ExtractParams = ExtractParams()
    finetune: FinetuneParams = FinetuneParams()
    flow: FlowParams = FlowParams()
    _origin: ParamsOrigin | None = PrivateAttr(default=None)  # set by load_params

    @property
    def origin(self) -> ParamsOrigin | None:
        return self._origin

    @model_validator(mode="after")
    def _partial_leaves_a_block_to_train(self) -> Params:
        if self.model.depth is not None:
            self.finetune.check_partial(self.model.depth)
        return self

    @model_validator(mode="before")
    @classmethod
    def _deprecated_source(cls, doc: Any) -> Any:
        """`source:` (one source, before `sources:`) is read as the source named `source`;
        `load_params` warns about it."""
        if isinstance(doc, dict) and "source" in doc:
            if "sources" in doc:
                raise ValueError("give sources (or the deprecated source), not both")
            doc = {**doc, "sources": {"source": doc["source"]}}
            del doc["source"]
        return doc

    @model_validator(mode="after")
    def _one_modality(self) -> Params:
        """Every dataset is of the backbone's modality; each source's objective fits it."""
        wanted = self.model.modality
        for key, spec in self.datasets_by_key.items():
            if wanted not in spec.modalities:
                held = spec.modalities[0]
                fits = {
                    "text": "transformer or pretrained",
                    "image": "timm",
                    "signal": "cnn1d or mlp",
                }[held]
                raise ValueError(
                    f"{key}: kind {spec.kind} holds {held}s, but model.backbone "
                    f"{self.model.backbone} takes {wanted}s (use {fits})"
                )
            if spec.corpus is not None and spec.corpus not in self.synthesis:
                corpora = ", ".join(self.synthesis) or "none"
                raise ValueError(
                    f"{key}.corpus: {spec.corpus!r} is not in synthesis (corpora: {corpora})"
                )
            audio = spec.kind in AUDIO_KINDS
            if wanted != "image" and not audio and spec.scramble_seed is not None:
                raise ValueError(f"{key}.scramble_seed: only for images and audio")
            if wanted == "signal" and spec.kind == "npz" and spec.max_per_class is not None:
                raise ValueError(f"{key}.max_per_class: only for images and fortunes")
        if self.pretrain.augment and self.pretrain.processes > 1:
            raise ValueError(
                "pretrain.augment runs in one process (pretrain.processes: 1): each rank would "
                "draw its share's augmentations alike"
            )
        for section in ("pretrain", "finetune"):
            if wanted != "image" and getattr(self, section).augment:
                raise ValueError(f"{section}.augment: only for images (model.backbone timm)")
        for name, spec in self.sources.items():
            self._check_objective(name, spec)
        for name, spec in self.targets.items():
            if spec.kind == "text" and spec.label_column is None:
                raise ValueError(f"targets.{name}.label_column: a target needs labels")
        return self

    def _check_objective(self, name: str, spec: SourceSpec) -> None:
        objective = spec.objective_or(self.pretrain.objective)
        key = f"sources.{name}.objective" if spec.objective else "pretrain.objective"
        if objective == "mlm" and self.model.backbone != "transformer":
            raise ValueError(f"{key}: mlm needs model.backbone transformer")
        if objective == "contrastive" and self.model.modality == "text":
            raise ValueError(f"{key}: contrastive is for signals and images (texts: mlm)")
        if objective != "supervised" and self.pretrain.processes > 1:
            raise ValueError(f"{key}: {objective} runs in one process (pretrain.processes: 1)")
        unlabelled = spec.kind == "text" and spec.label_column is None
        if unlabelled and objective == "supervised":
            raise ValueError(f"sources.{name} has no label_column: pretrain it with objective mlm")

    @model_validator(mode="after")
    def _source_names(self) -> Params:
        """Sources and targets share data/prepared/: one name each. A joint source unites
        others; texts have one source (its tokenizer makes every target's ids), and
        off-the-shelf weights are one backbone, not one per source."""
        both = sorted(set(self.sources) & set(self.targets))
        if both:
            raise ValueError(f"{both[0]!r} names a source and a target: give them other names")
        for name, spec in self.sources.items():
            for member in spec.of or []:
                if member not in self.sources or self.sources[member].kind == "joint":
                    uniteable = ", ".join(n for n, s in self.sources.items() if s.of is None)
                    raise ValueError(
                        f"sources.{name}.of: {member!r} is not a source to unite "
                        f"(sources: {uniteable})"
                    )
        if self.model.modality == "text" and len(self.sources) > 1:
            raise ValueError(
                "sources: texts take one source (its tokenizer makes every target's token ids)"
            )
        if self.model.pretrained_path is not None and len(self.sources) > 1:
            raise ValueError(
                "sources: off-the-shelf weights (model.pretrained_path) take one source"
            )
        trained = [n for n, s in self.sources.items() if s.objective is not None]
        if self.model.pretrained_path is not None and trained:
            raise ValueError(
                f"sources.{trained[0]}.objective: off-the-shelf weights are not pretrained here"
            )
        return self

    @property
    def datasets_by_key(self) -> dict[str, DatasetSpec]:
        """Every dataset but the joint sources (their members are here), by dotted key."""
        sources = {f"sources.{n}": s for n, s in self.sources.items() if s.kind != "joint"}
        return sources | self.targets_by_key

    @property
    def targets_by_key(self) -> dict[str, DatasetSpec]:
        return {f"targets.{name}": spec for name, spec in self.targets.items()}

    @field_validator("sources", "targets")
    @classmethod
    def _some_datasets(cls, named: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        if not named:
            raise ValueError("must name at least one dataset")
        return named

    @field_validator("sources", "targets", "synthesis")
    @classmethod
    def _names(cls, named: dict[str, Any]) -> dict[str, Any]:
        """Names become folder and stage names (data/prepared/<name>, pretrain@<name>)."""
        for name in named:
            if not TARGET_NAME.fullmatch(name):
                raise ValueError(
                    f"name {name!r} must start with a letter or digit and hold only "
                    "A-Z a-z 0-9 _ -"
                )
        return named


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _format_loc(loc: tuple[Any, ...]) -> str:
    """("finetune", "seeds", 1) -> "finetune.seeds.1: "; odd keys are quoted, so that a key
    holding a newline cannot break the one-line message."""
    parts = [str(p) if re.fullmatch(r"[\w-]+", str(p)) else repr(p) for p in loc]
    return f"{'.'.join(parts)}: " if parts else ""


def _format_validation_error(err: ValidationError, path: Path) -> str:
    problems = []
    for item in err.errors():
        key = _format_loc(item["loc"])  # "finetune.seeds.1: ", or "" for whole-file checks
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}unknown key")
        elif item["type"] == "missing":
            problems.append(f"{key}required key is missing")
        elif not key:
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{key}{item['msg']} (got {json.dumps(item['input'], default=str)})")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{path}: {problems[0]}{more}"


def _apply_override(doc: dict[str, Any], assignment: str, path: Path) -> None:
    """Set `a.b.c=value` in the raw document; the value is parsed as YAML (`[0, 1]`, `0.5`)."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key:
        raise ParamsError(
            f"override {assignment!r}: expected KEY=VALUE, e.g. finetune.seeds=[0,1]"
        )
    try:
        value = yaml.load(raw_value, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {key}: value {raw_value!r} is not valid YAML") from err
    node = doc
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parents[: depth + 1])
            raise ParamsError(f"{path}: override {key}: {prefix} is not a mapping")
        node = child
    node[leaf] = value


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> Params:
    """Read, override and validate a params file; raise ParamsError with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: params file not found") from err
    except OSError as err:
        raise ParamsError(f"{path}: cannot read params file ({err.strerror})") from err
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path}: YAML does not parse{where}: {problem}") from err
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of params at the top level")
    if path.name == DEFAULT_PARAMS.name and (path.parent / "dvc.yaml").is_file():
        written = copy.deepcopy(doc)  # what DVC reads: the file, without the overrides
    else:
        written = None
    for assignment in overrides:
        _apply_override(doc, assignment, path)
    if "source" in doc and "sources" not in doc:
        if path.name == DEFAULT_PARAMS.name:
            raise ParamsError(
                f"{path}: `source:` is deprecated, and dvc.yaml (which runs pretrain per entry "
                "of `sources`) cannot read it here: write `sources: {source: ...}` (the same "
                "entry, indented under a name)"
            )
        log.warning(
            "%s: `source:` is deprecated and read as `sources: {source: ...}`; write `sources:` "
            "(one or more named sources)",
            path,
        )
    if written is not None:
        _check_dvc_reads(written, path)
    try:
        params = Params.model_validate(doc)
    except ValidationError as err:
        raise ParamsError(_format_validation_error(err, path)) from err
    _check_paths_exist(params, path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()  # as `sha256sum` gives it
    params._origin = ParamsOrigin(path=str(path), sha256=sha256, overrides=tuple(overrides))
    return params


def _check_dvc_reads(doc: dict[str, Any], path: Path) -> None:
    """Every params key that dvc.yaml (beside params.yaml) lists is in the file: DVC refuses a
    params.yaml without one, and in the flow only after the stage has run. Keys added since a
    user's params.yaml was written (`audio`, `synthesis`) are the usual cause."""
    stages = yaml.safe_load((path.parent / "dvc.yaml").read_text()).get("stages", {})
    for stage in stages.values():
        for key in stage.get("do", stage).get("params", []):
            key = key.split(".${")[0]  # a per-entry key (sources.${key}): its mapping
            node: Any = doc
            for depth, part in enumerate(key.split(".")):
                if not isinstance(node, dict) or part not in node:
                    missing = ".".join(key.split(".")[: depth + 1])
                    add = (
                        "`synthesis: {}` for no corpora"
                        if missing == "synthesis"
                        else "as the repository's params.yaml has it"
                    )
                    raise ParamsError(
                        f"{path}: {missing}: missing; dvc.yaml reads it from this file "
                        f"(`dvc repro` refuses the file without it): add it, {add}"
                    )
                node = node[part]


def _check_paths_exist(params: Params, path: Path) -> None:
    for key, spec in params.datasets_by_key.items():
        if spec.kind == "fortunes":
            _check_fortunes(spec, key, path)
        elif spec.kind in FOLDER_KINDS and spec.path is not None and not spec.path.is_dir():
            raise ParamsError(f"{path}: {key}.path: folder {str(spec.path)!r} does not exist")
        elif spec.kind not in FOLDER_KINDS and spec.path is not None and not spec.path.is_file():
            raise ParamsError(f"{path}: {key}.path: file {str(spec.path)!r} does not exist")
    model = params.model.pretrained_path
    if model is not None and params.model.backbone == "pretrained":
        _check_pretrained_depth(params, model, path)
    if model is not None and params.model.backbone == "timm" and not model.is_file():
        raise ParamsError(f"{path}: model.pretrained_path: file {str(model)!r} does not exist")


def _check_pretrained_depth(params: Params, model: Path, path: Path) -> None:
    """The encoder's layers and positions, from its config.json (its weights are checked when
    `prepare` reads them)."""
    if not model.is_dir():
        raise ParamsError(
            f"{path}: model.pretrained_path: directory {str(model)!r} does not exist"
        )
    try:
        config = json.loads((model / "config.json").read_text())
        layers, positions = config["num_hidden_layers"], config["max_position_embeddings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ParamsError(
            f"{path}: model.pretrained_path: {model / 'config.json'} is not a readable Hugging "
            f"Face config with num_hidden_layers and max_position_embeddings "
            f"({type(err).__name__}: {err})"
        ) from err
    if params.text.max_tokens > positions:
        raise ParamsError(
            f"{path}: text.max_tokens ({params.text.max_tokens}) exceeds the {positions} "
            f"positions of the encoder in {model}"
        )
    try:
        params.finetune.check_partial(int(layers))
    except ValueError as err:
        raise ParamsError(f"{path}: {err}") from err


def _check_fortunes(spec: DatasetSpec, key: str, path: Path) -> None:
    if not spec.fortunes_dir.is_dir():
        raise ParamsError(
            f"{path}: {key}: no fortunes at {spec.fortunes_dir} (install Debian's fortunes "
            "packages: apt-get install fortunes fortunes-de fortunes-es, or set path)"
        )
    missing = [c for c in spec.classes or [] if not (spec.fortunes_dir / str(c)).is_file()]
    if missing:
        raise ParamsError(
            f"{path}: {key}.classes: no fortune file {missing[0]!r} in {spec.fortunes_dir} "
            "(Debian's fortunes, fortunes-es, fortunes-de... packages install them)"
        )
