"""The forward pass of many small networks of one architecture at once: what the fine-tuning
ensemble (tasks/learning/ensemble.py) trains its members with.

Each member's weights are a slice of a stacked tensor (M, *shape). The members' convolutions
are one grouped convolution (groups = M, the members' channels side by side), their linear
layers one batched matrix product. `torch.func.vmap` over `functional_call` lowers to the same
kernels, with a fixed cost per step of its own; written out, a step of the default grid's stack
is about 10% faster. Backbones: `cnn1d` and `mlp` (tasks/models/classifier.py), the ones that
train stacked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.classifier import Cnn1d, Mlp

Weights = dict[str, torch.Tensor]  # parameter name -> (M, *shape): one slice per member


def stackable(model: nn.Module) -> bool:
    """Whether `stacked_logits` runs this model's architecture."""
    return isinstance(getattr(model, "backbone", None), Cnn1d | Mlp)


def stacked_logits(template: nn.Module, weights: Weights, x: torch.Tensor) -> torch.Tensor:
    """Every member's logits: x (M, B, C, L), each member its own batch, or (B, C, L), one batch
    for all -> (M, B, K). `template` gives the structure only (it may be on the meta device);
    `weights` its parameters by name, stacked."""
    members = weights["head.weight"].shape[0]
    backbone = template.backbone
    if isinstance(backbone, Cnn1d):
        features = _cnn1d(backbone, weights, x, members)
    elif isinstance(backbone, Mlp):
        features = _mlp(backbone, weights, x, members)
    else:
        raise TypeError(f"no stacked forward for a {type(backbone).__name__} backbone")
    return _linear(features, weights["head.weight"], weights["head.bias"])  # (M, B, K)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (M, B, D), weight (M, K, D), bias (M, K) -> (M, B, K)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _cnn1d(backbone: Cnn1d, weights: Weights, x: torch.Tensor, members: int) -> torch.Tensor:
    """(M, B, C, L) or (B, C, L) -> (M, B, channels[-1]), as Cnn1d.forward: strided convolutions
    and ReLU, then the mean over time."""
    if x.dim() == 4:  # (M, B, C, L) -> (B, M * C, L): each member's channels, side by side
        groups, h = members, x.transpose(0, 1).flatten(1, 2)
    else:  # one input for all: the first layer is one convolution with every member's filters
        groups, h = 1, x
    for i, block in enumerate(backbone.blocks):
        conv, prefix = block[0], f"backbone.blocks.{i}.0."
        weight, bias = weights[prefix + "weight"], weights[prefix + "bias"]  # (M, O, C, k), (M, O)
        h = F.conv1d(
            h,
            weight.flatten(0, 1),  # (M * O, C, k)
            bias.flatten(),
            stride=conv.stride,
            padding=conv.padding,
            groups=groups,
        )
        h = F.relu(h)  # (B, M * O, L_i)
        groups = members
    batch = h.shape[0]
    return h.mean(-1).view(batch, members, -1).transpose(0, 1)  # (M, B, channels[-1])


def _mlp(backbone: Mlp, weights: Weights, x: torch.Tensor, members: int) -> torch.Tensor:
    """(M, B, C, L) or (B, C, L) -> (M, B, hidden[-1]), as Mlp.forward."""
    h = x.flatten(-2)  # (M, B, C * L), or (B, C * L)
    if h.dim() == 2:
        h = h.expand(members, *h.shape)
    for i in range(len(backbone.blocks)):
        prefix = f"backbone.blocks.{i}.0."
        h = F.relu(_linear(h, weights[prefix + "weight"], weights[prefix + "bias"]))
    return h
