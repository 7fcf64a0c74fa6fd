"""Image backbones from timm: any `timm.list_models()` architecture, created without downloads,
split into the stages that `partial` freezes and layer-wise decay counts, and optionally loaded
with off-the-shelf weights from a local file (what `pretrained=True` would fetch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.learning.runtime import seeded_process_rng
from tasks.models.errors import CheckpointError


class TimmBackbone(nn.Module):
    """A timm model without its classifier. x: (B, C, H, W) pixels in [0, 1] -> (B, D).

    The pixels are standardised inside the network with the architecture's own mean and std
    (ImageNet's for most; their average over the channels for grey inputs), so that scratch,
    pretrained and off-the-shelf weights all see what their training saw. `blocks` are timm's
    feature stages (`feature_info`: the stem, then each stage), lowest first."""

    def __init__(self, architecture: str, in_chans: int, args: dict[str, Any]):
        super().__init__()
        import timm  # a slow import, for image studies only

        try:
            # timm initialises from torch's process-wide generator: under its lock, so that
            # it draws nothing from under another thread's seeded augmentation (the stages
            # build networks while groups train); the run's weights are drawn again from its
            # own generator (classifier.reset_parameters)
            with seeded_process_rng(0):
                self.net = timm.create_model(
                    architecture, pretrained=False, num_classes=0, in_chans=in_chans, **args
                )
        except (RuntimeError, TypeError, ValueError) as err:  # unknown name, bad args
            raise CheckpointError(
                f"model.architecture {architecture} with args {args}: {str(err).splitlines()[0]}"
            ) from err
        self.feature_dim = self.net.num_features
        cfg = self.net.pretrained_cfg
        mean, std = torch.tensor(cfg.get("mean", (0.5,))), torch.tensor(cfg.get("std", (0.5,)))
        if in_chans != len(mean):  # grey: one channel, the colour channels' average
            mean, std = mean.mean().repeat(in_chans), std.mean().repeat(in_chans)
        # not in the state dict: they follow from the architecture, not from training
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self._stages = _stages(self.net)

    @property
    def blocks(self) -> nn.ModuleList:
        """The stages, lowest first, each a ModuleList of the modules holding its parameters
        (a view: the modules stay registered under `net` alone)."""
        return nn.ModuleList(nn.ModuleList(stage) for stage in self._stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std  # (B, C, H, W)
        if x.is_cuda:  # the memory layout cuDNN's convolutions run fastest in (with bf16)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)  # (B, D): timm's global pooling

    def train(self, mode: bool = True) -> TimmBackbone:
        """Frozen stages (no parameter trains) stay in eval mode: their batch norms keep the
        pretrained statistics instead of drifting to the target's batches."""
        super().train(mode)
        for stage in self._stages:
            params = [p for module in stage for p in module.parameters()]
            if mode and params and not any(p.requires_grad for p in params):
                for module in stage:
                    module.eval()
        return self


def _stages(net: nn.Module) -> list[list[nn.Module]]:
    """Group the network's parameter-holding modules by timm's feature stages: a module belongs
    to the first stage whose boundary module (`feature_info[i]["module"]`) it comes before or
    lies within, in registration (forward) order; modules after the last boundary (a final
    norm) join the last stage."""
    names = [name for name, _ in net.named_modules()]
    position = {name: i for i, name in enumerate(names)}
    ends = []  # the position of each boundary's last submodule
    for info in net.feature_info:
        boundary = info["module"]
        inside = [i for i, n in enumerate(names) if n == boundary or n.startswith(boundary + ".")]
        ends.append(max(inside))
    stages: list[list[nn.Module]] = [[] for _ in ends]
    for name, module in net.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        index = next((i for i, end in enumerate(ends) if position[name] <= end), len(ends) - 1)
        stages[index].append(module)
    return [stage for stage in stages if stage]


def stage_count(architecture: str, args: dict[str, Any]) -> int:
    """How many stages `partial` can freeze a prefix of, in a timm architecture."""
    return len(TimmBackbone(architecture, 1, args).blocks)


def reset_image_layer(module: nn.Module, generator: torch.Generator) -> bool:
    """Init a Conv2d, a 2-D batch norm or a group norm from `generator` (see
    classifier.reset_parameters): True if `module` is one. Conv2d: PyTorch's default (Kaiming
    uniform, a = sqrt 5); norms: weight 1, bias 0 (where affine), fresh running statistics."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_uniform_(module.weight, a=5**0.5, generator=generator)
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            nn.init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5, generator=generator)
        return True
    if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
        return True
    return False


def load_off_the_shelf(backbone: TimmBackbone, path: Path) -> None:
    """Load a weights file for the backbone's architecture, as timm's `pretrained=True` does
    with a download: the classifier's weights are dropped, and the first convolution is adapted
    to the input's channels (summed over RGB for grey inputs). Files: .safetensors, or a torch
    state dict (.pth, .pt, .bin; timm's or torchvision's, whose ResNets share timm's names)."""
    net = backbone.net
    try:
        state = _read_state_dict(path)
    except Exception as err:  # a torn or foreign file: one line naming it
        raise CheckpointError(f"{path}: not a readable weights file ({err})") from err
    cfg = net.pretrained_cfg
    classifier = cfg.get("classifier")
    for name in [classifier] if isinstance(classifier, str) else list(classifier or []):
        state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
    first = cfg.get("first_conv")
    conv_key = f"{first}.weight" if isinstance(first, str) else None
    wanted_in = net.get_submodule(first).in_channels if first else None
    if conv_key in state and state[conv_key].shape[1] != wanted_in:
        from timm.models import adapt_input_conv

        state[conv_key] = adapt_input_conv(wanted_in, state[conv_key])
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: these weights are not a {cfg.get('architecture')} with the params' "
            f"architecture_args: {str(err).splitlines()[0]}"
        ) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("it holds no state dict of tensors")
    return state
