"""Backbones (a registry by name) split into `features(x)` and a replaceable linear head, and the
self-describing checkpoint that rebuilds one from nothing but the file."""

from __future__ import annotations

import itertools
import math
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.learning.runtime import seeded_process_rng
from tasks.models.errors import CheckpointError
from tasks.models.shapes import input_args
from tasks.models.transformer import TextEncoder, seeded_init
from tasks.models.vision import reset_image_layer
from tasks.workspace import files

CHECKPOINT_FORMAT = 2  # 2: cnn1d pools over time (format 1 flattened)


class Cnn1d(nn.Module):
    """Strided 1D convolutions, as in the MNIST-1D paper's CNN, ending in global average pooling
    as the fully convolutional networks of time-series transfer do (Fawaz et al. 2018): the
    weights do not depend on the series' length, so a backbone pretrained on one length takes
    any other. x: (B, C, L) -> (B, channels[-1])."""

    def __init__(self, in_channels: int, channels: list[int], kernel_size: int):
        super().__init__()
        blocks, width = [], in_channels
        for out in channels:
            conv = nn.Conv1d(width, out, kernel_size, stride=2, padding=kernel_size // 2)
            blocks.append(nn.Sequential(conv, nn.ReLU()))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # (B, C_i, L_i), L halves per block
        return x.mean(-1)  # (B, C_last): the average over time


class Mlp(nn.Module):
    """Fully connected layers on the flattened input. x: (B, C, L) -> (B, hidden[-1])."""

    def __init__(self, in_channels: int, length: int, hidden: list[int]):
        super().__init__()
        widths = [in_channels * length, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in itertools.pairwise(widths)
        )
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return x


def _timm_backbone(arch: dict[str, Any]) -> nn.Module:
    from tasks.models.vision import TimmBackbone  # timm: a slow import

    return TimmBackbone(arch["architecture"], arch["in_chans"], arch["args"])


def _pretrained_encoder(arch: dict[str, Any]) -> nn.Module:
    from tasks.models.pretrained import PretrainedEncoder  # transformers: a slow import

    return PretrainedEncoder(arch["config"], arch["pad_id"])


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cnn1d": lambda a: Cnn1d(a["in_channels"], a["channels"], a["kernel_size"]),
    "mlp": lambda a: Mlp(a["in_channels"], a["length"], a["hidden"]),
    "transformer": lambda a: TextEncoder(
        *(a[k] for k in ("vocab_size", "width", "layers", "heads", "ff_width", "max_tokens")),
        pad_id=a["pad_id"],
    ),
    "pretrained": _pretrained_encoder,  # arch: the encoder's Hugging Face config and pad id
    "timm": _timm_backbone,  # arch: timm's model name and args, and the input's channels
}


# backbones whose fine-tuning runs train as one vectorised ensemble (tasks/learning/ensemble.py):
# small networks whose steps are bound by per-operation overhead. Text encoders train one run
# after another: stacked, their steps took 1.2x as long on CPU (bench/text_ensemble.py); so do
# timm's image networks: the stack passes parameters only, and their buffers (batch-norm
# statistics) would have to be stacked per member too, and even so 6 stacked ResNets stepped no
# faster than one after another (0.91-0.98x, bench/image_ensemble.py).
VECTORISED = frozenset({"cnn1d", "mlp"})


class Classifier(nn.Module):
    """backbone -> linear head. Fine-tuning strategies swap the head and choose what trains."""

    def __init__(self, backbone: nn.Module, num_classes: int, arch: dict[str, Any]):
        super().__init__()
        self.arch = arch  # the args that rebuilt this backbone (see `architecture`)
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        # backbone parameters that start fresh rather than pretrained (see pretrained_classifier)
        self.fresh: frozenset[str] = frozenset()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, D): what `extract` caches and the probe reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


def reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default init of Linear and Conv1d layers, drawn from `generator` instead of the
    process-wide RNG: that one is shared by every thread (Prefect runs tasks in a thread pool),
    so a draw elsewhere would change the weights."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if seeded_init(module, generator):  # embeddings, norms, attention (and its out_proj)
            continue
        if reset_image_layer(module, generator):  # Conv2d, batch and group norms
            continue
        if not isinstance(module, nn.Linear | nn.Conv1d):
            raise CheckpointError(
                f"model: no seeded init for its {type(module).__name__} layers (known: Linear, "
                "Conv1d/2d, batch, group and layer norms, embeddings, attention); use another "
                "architecture, or add one in tasks/models/classifier.py reset_parameters"
            )
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def freeze_lower(model: Classifier, blocks: int) -> None:
    """Freeze the backbone's lowest `blocks` blocks, and a text encoder's input embeddings."""
    if blocks and hasattr(model.backbone, "embed"):
        model.backbone.embed.requires_grad_(False)
    model.backbone.blocks[:blocks].requires_grad_(False)


def depth_below_head(model: Classifier) -> dict[str, int]:
    """Each parameter's distance from the head, in blocks: 0 for the head, 1 for the top
    backbone block, ..., n for the lowest of n, n + 1 for a text encoder's input embeddings
    (the numbering of layer-wise learning-rate decay, as in BEiT and ELECTRA)."""
    blocks = model.backbone.blocks
    by_param = {
        id(p): len(blocks) - i for i, block in enumerate(blocks) for p in block.parameters()
    }
    if hasattr(model.backbone, "embed"):
        by_param |= {id(p): len(blocks) + 1 for p in model.backbone.embed.parameters()}
    return {
        name: by_param.get(id(p), 1 if name.startswith("backbone.") else 0)
        for name, p in model.named_parameters()
    }


def build_classifier(arch: dict[str, Any], num_classes: int, seed: int) -> Classifier:
    """A freshly initialised classifier; the same seed gives the same weights in any thread."""
    # layers initialise themselves from torch's process-wide generator as they are built
    # (timm's too): under its lock, so that they draw nothing from under another thread's
    # seeded augmentation; their weights are then drawn from the run's own generator
    with seeded_process_rng(seed):
        model = Classifier(BACKBONES[arch["name"]](arch), num_classes, arch)
    reset_parameters(model, torch.Generator().manual_seed(seed))
    return model


def save_checkpoint(path: Path, model: Classifier, **extra: Any) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "num_classes": model.head.out_features,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    files.torch_save(path, payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without executing any code from it (weights_only=True)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: checkpoint not found (run the pretrain stage)") from err
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data "
            f"({first})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({err})") from err
    expected = {"format", "arch", "num_classes", "state_dict"}
    if not isinstance(payload, dict) or not expected <= payload.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (needs keys {expected})")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format']!r}, this code reads {CHECKPOINT_FORMAT}"
        )
    if payload["arch"].get("name") not in BACKBONES:
        raise CheckpointError(
            f"{path}: unknown backbone {payload['arch'].get('name')!r}, expected one of "
            f"{sorted(BACKBONES)}"
        )
    return payload


def arch_for(arch: dict[str, Any], input_shape: tuple[int, int]) -> dict[str, Any]:
    """The architecture `arch` (a checkpoint's) built for inputs of `input_shape` (C, L): the
    same, but for the input layer's args where the shape differs (see pretrained_classifier);
    scratch builds from it too, so that it is the same network as the transfer runs'."""
    return {**arch, **input_args(arch["name"], input_shape)}


# A fresh input layer (a target whose shape the pretrained one cannot take) is drawn from this
# seed in every stage and run, so that the features `extract` gives the probe are the features
# every fine-tuned network starts from (lp_ft puts the probe's head on them).
FRESH_INPUT_SEED = 0


def pretrained_classifier(
    payload: dict[str, Any],
    num_classes: int,
    seed: int,
    path: Path,
    input_shape: tuple[int, int] | None = None,
) -> Classifier:
    """The checkpoint's backbone with a fresh head of `num_classes` outputs (seeded init).

    For inputs of `input_shape` (C, L) that the pretrained input layer cannot take (another
    channel count; for mlp, another C x L), the first block starts fresh and every other layer
    keeps its pretrained weights; its parameter names are in `model.fresh`, and fine-tuning
    trains them at the head's learning rate, never frozen.
    """
    arch = payload["arch"] if input_shape is None else arch_for(payload["arch"], input_shape)
    model = build_classifier(arch, num_classes, seed)
    pretrained = {
        k.removeprefix("backbone."): v
        for k, v in payload["state_dict"].items()
        if k.startswith("backbone.")
    }
    if arch != payload["arch"]:
        fresh = build_classifier(arch, num_classes, FRESH_INPUT_SEED).backbone.blocks[0]
        layer = {f"blocks.0.{name}": value for name, value in fresh.state_dict().items()}
        pretrained |= layer
        model.fresh = frozenset(f"backbone.{name}" for name in layer)
    try:
        model.backbone.load_state_dict(pretrained)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the architecture it declares ({payload['arch']}): "
            f"{str(err).splitlines()[0]}"
        ) from err
    return model


def classifier_from_checkpoint(path: Path, num_classes: int, seed: int) -> Classifier:
    return pretrained_classifier(load_checkpoint(path), num_classes, seed, path)
