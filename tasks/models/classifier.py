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

from tasks.config.params import ModelParams
from tasks.models.errors import CheckpointError
from tasks.workspace import files

CHECKPOINT_FORMAT = 1


class Cnn1d(nn.Module):
    """Strided 1D convolutions, as in the MNIST-1D paper's CNN. x: (B, C, L) -> (B, D)."""

    def __init__(self, in_channels: int, length: int, channels: list[int], kernel_size: int):
        super().__init__()
        blocks, width = [], in_channels
        for out in channels:
            conv = nn.Conv1d(width, out, kernel_size, stride=2, padding=kernel_size // 2)
            blocks.append(nn.Sequential(conv, nn.ReLU()))
            length = (length + 2 * (kernel_size // 2) - kernel_size) // 2 + 1
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = width * length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # (B, C_i, L_i), L halves per block
        return x.flatten(1)  # (B, C_last * L_last)


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


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "cnn1d": lambda a: Cnn1d(a["in_channels"], a["length"], a["channels"], a["kernel_size"]),
    "mlp": lambda a: Mlp(a["in_channels"], a["length"], a["hidden"]),
}


class Classifier(nn.Module):
    """backbone -> linear head. Fine-tuning strategies swap the head and choose what trains."""

    def __init__(self, backbone: nn.Module, num_classes: int, arch: dict[str, Any]):
        super().__init__()
        self.arch = arch  # the args that rebuilt this backbone (see `architecture`)
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, D): what `extract` caches and the probe reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


def architecture(model: ModelParams, input_shape: tuple[int, int]) -> dict[str, Any]:
    """The args that rebuild a backbone; stored in every checkpoint."""
    in_channels, length = input_shape
    arch: dict[str, Any] = {"name": model.backbone, "in_channels": in_channels, "length": length}
    if model.backbone == "cnn1d":
        arch |= {"channels": list(model.channels), "kernel_size": model.kernel_size}
    else:
        arch |= {"hidden": list(model.hidden)}
    return arch


def _reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default init of Linear and Conv1d layers, drawn from `generator` instead of the
    process-wide RNG: that one is shared by every thread (Prefect runs tasks in a thread pool),
    so a draw elsewhere would change the weights."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(module, nn.Linear | nn.Conv1d):
            raise TypeError(f"no seeded init for {type(module).__name__}; add it here")
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def build_classifier(arch: dict[str, Any], num_classes: int, seed: int) -> Classifier:
    """A freshly initialised classifier; the same seed gives the same weights in any thread."""
    model = Classifier(BACKBONES[arch["name"]](arch), num_classes, arch)
    _reset_parameters(model, torch.Generator().manual_seed(seed))
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


def pretrained_classifier(
    payload: dict[str, Any], num_classes: int, seed: int, path: Path
) -> Classifier:
    """The checkpoint's backbone with a fresh head of `num_classes` outputs (seeded init)."""
    model = build_classifier(payload["arch"], num_classes, seed)
    backbone_state = {
        k.removeprefix("backbone."): v
        for k, v in payload["state_dict"].items()
        if k.startswith("backbone.")
    }
    try:
        model.backbone.load_state_dict(backbone_state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit the architecture it declares ({payload['arch']}): "
            f"{str(err).splitlines()[0]}"
        ) from err
    return model


def classifier_from_checkpoint(path: Path, num_classes: int, seed: int) -> Classifier:
    return pretrained_classifier(load_checkpoint(path), num_classes, seed, path)
