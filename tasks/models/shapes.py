"""What shape of input a backbone takes, without building one (no torch here: the pre-flight
check uses it before any heavy import). The first layer is the only one whose shape depends on
the input's: cnn1d takes any length (it pools over time) but a fixed channel count, mlp a fixed
C x L. A target it cannot take gets a fresh input layer (tasks.models.classifier). Text encoders
take any text of the study: every dataset is encoded by one tokenizer to one length."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tasks.config.params import TEXT_BACKBONES, ModelParams
from tasks.data.datasets import DataError


def input_args(backbone: str, input_shape: tuple[int, ...]) -> dict[str, int]:
    """The architecture's args that depend on the input's shape (C, L): the first layer's."""
    if backbone in TEXT_BACKBONES:
        return {}
    if backbone == "timm":  # any size: it pools over space; `prepare` gives every dataset
        return {"in_chans": input_shape[0]}  # the channels of params' image.channels
    in_channels, length = input_shape
    if backbone == "cnn1d":
        return {"in_channels": in_channels}  # any length: it pools over time
    return {"in_channels": in_channels, "length": length}  # mlp: it flattens C x L


def architecture(
    model: ModelParams, input_shape: tuple[int, ...], tokens: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The args that rebuild a backbone; stored in every checkpoint. Our transformer's also
    depend on the token ids (`tokens`: a text dataset's meta, see tasks/data/tokens.py); the
    pretrained encoder's come from its own directory, in `pretrain`."""
    arch: dict[str, Any] = {"name": model.backbone, **input_args(model.backbone, input_shape)}
    if model.backbone == "cnn1d":
        arch |= {"channels": list(model.channels), "kernel_size": model.kernel_size}
    elif model.backbone == "mlp":
        arch |= {"hidden": list(model.hidden)}
    elif model.backbone == "timm":
        arch |= {"architecture": model.architecture, "args": dict(model.architecture_args)}
    elif model.backbone == "transformer":
        arch |= {
            **{"width": model.width, "layers": model.layers, "heads": model.heads},
            **{"ff_width": model.ff_width, "max_tokens": input_shape[0]},
            **{"vocab_size": tokens["vocab_size"], "pad_id": tokens["pad_id"]},
        }
    return arch


def input_mismatch(arch: dict[str, Any], input_shape: tuple[int, int]) -> str | None:
    """Why a pretrained backbone's input layer cannot take inputs of `input_shape`, or None.
    Such a target gets a fresh input layer (see `pretrained_classifier`)."""
    wanted = input_args(arch["name"], input_shape)
    differs = [
        f"{key} {value} (pretrained on {arch[key]})"
        for key, value in wanted.items()
        if arch[key] != value
    ]
    return ", ".join(differs) or None


def transfer_note(arch: dict[str, Any], target: str, shape: tuple[int, int]) -> str | None:
    """None when the pretrained backbone `arch` takes inputs of `shape` (C, L) as they are;
    else a line saying that the target gets a fresh input layer. Raises DataError when that
    layer is the backbone's only one: nothing pretrained would be left to transfer."""
    mismatch = input_mismatch(arch, shape)
    if mismatch is None:
        return None
    if len(arch["channels"] if arch["name"] == "cnn1d" else arch["hidden"]) == 1:
        fix = (
            "add a block to model.channels"
            if arch["name"] == "cnn1d"
            else "use model.backbone cnn1d, which takes any length, or add a layer to model.hidden"
        )
        raise DataError(
            f"targets.{target}: the {arch['name']} backbone's only layer is its input layer, "
            f"which cannot take {mismatch}: nothing pretrained would be left to transfer ({fix})"
        )
    return f"targets.{target}: a fresh input layer for {mismatch}"


def check_targets_fit(
    model: ModelParams, shapes: dict[str, tuple[int, int]], source: str, targets: Iterable[str]
) -> list[str]:
    """Before pretraining (pre-flight, and the pretrain stage): `transfer_note` for every target
    of the backbone pretrained on `source`. `shapes`: (C, L) of every dataset by name."""
    if model.modality != "signal":
        return []  # texts: one tokenizer, one length; images: one size, one channel count
    arch = architecture(model, shapes[source])
    notes = [transfer_note(arch, name, shapes[name]) for name in targets]
    return [note for note in notes if note is not None]
