"""The forward pass of many small networks of one architecture at once: what the fine-tuning
ensemble (tasks/learning/ensemble.py) trains its members with.

Each member's weights are a slice of a stacked tensor (M, *shape). cnn1d's first layer is one
matrix product of the input's windows with the members' filters, its other layers one grouped
convolution each (groups = M, the members' channels side by side); linear layers are one
batched matrix product. Anything else goes through `torch.func.vmap` over `functional_call`
(tasks/learning/ensemble.py), which pays a fixed cost per step of its own. Backbones: `cnn1d`
and `mlp` (tasks/models/classifier.py), the ones that train stacked. The layouts were chosen
on CPU (bench/stacked_conv.py); on a GPU they are correct but their speed is unmeasured.
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
    and ReLU, then the mean over time.

    The first layer is a matrix product on the input's windows (oneDNN's convolution of one or
    a few input channels is slow: 3 GFLOP/s here); the others are one grouped 2D convolution
    each, on activations laid out channels-last (B, 1, L_i, M * O): the members' channels side
    by side innermost, which oneDNN's kernels take without reordering them. Against grouped 1D
    convolutions on (B, M * O, L_i), side by side (bench/stacked_conv.py, 2 threads): a
    training step of 6 to 54 members 1.03x to 1.16x faster, a validation pass 1.6x."""
    h = _first_layer(backbone.blocks[0][0], weights, x, members)  # (B, M * O, 1, L_1)
    for i, block in enumerate(backbone.blocks[1:], start=1):
        conv, prefix = block[0], f"backbone.blocks.{i}.0."
        weight, bias = weights[prefix + "weight"], weights[prefix + "bias"]  # (M, O, C, k), (M, O)
        h = F.conv2d(
            h,
            weight.flatten(0, 1).unsqueeze(2),  # (M * O, C, 1, k)
            bias.flatten(),
            stride=(1, conv.stride[0]),
            padding=(0, conv.padding[0]),
            groups=members,
        )
        h = F.relu(h)  # (B, M * O, 1, L_i), channels-last
    batch = h.shape[0]
    return h.mean((-2, -1)).view(batch, members, -1).transpose(0, 1)  # (M, B, channels[-1])


def _first_layer(conv: nn.Conv1d, weights: Weights, x: torch.Tensor, members: int) -> torch.Tensor:
    """The first convolution and its ReLU as a product of the input's windows and the members'
    filters: x (M, B, C, L) or (B, C, L) -> (B, M * O, 1, L_out), channels-last."""
    weight = weights["backbone.blocks.0.0.weight"].flatten(2)  # (M, O, C * k)
    bias = weights["backbone.blocks.0.0.bias"]  # (M, O)
    (kernel,), (stride,), (padding,) = conv.kernel_size, conv.stride, conv.padding
    # every output position's window: (..., C, L_out, k) -> (..., L_out, C * k), a copy
    windows = F.pad(x, (padding, padding)).unfold(-1, kernel, stride).transpose(-3, -2).flatten(-2)
    batch, length = windows.shape[-3], windows.shape[-2]
    if x.dim() == 4:  # each member its own windows: (M, B * L_out, C * k) @ (M, C * k, O)
        h = _linear(windows.flatten(1, 2), weight, bias)  # (M, B * L_out, O)
        # (M, B, L_out, O) -> (B, L_out, M, O): the members' channels side by side, a copy
        h = F.relu(h).view(members, batch, length, -1).permute(1, 2, 0, 3)
        h = h.reshape(batch, 1, length, -1)
    else:  # one input for all: one product with every member's filters (B * L_out, M * O)
        h = torch.addmm(bias.flatten(), windows.flatten(0, 1), weight.flatten(0, 1).T)
        h = F.relu(h).view(batch, 1, length, -1)
    return h.permute(0, 3, 1, 2)  # (B, M * O, 1, L_out): a view, channels-last


def _mlp(backbone: Mlp, weights: Weights, x: torch.Tensor, members: int) -> torch.Tensor:
    """(M, B, C, L) or (B, C, L) -> (M, B, hidden[-1]), as Mlp.forward."""
    h = x.flatten(-2)  # (M, B, C * L), or (B, C * L)
    if h.dim() == 2:
        h = h.expand(members, *h.shape)
    for i in range(len(backbone.blocks)):
        prefix = f"backbone.blocks.{i}.0."
        h = F.relu(_linear(h, weights[prefix + "weight"], weights[prefix + "bias"]))
    return h
