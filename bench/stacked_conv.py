"""The stacked cnn1d forward (tasks/models/stacked.py) against the plain formulation, grouped 1D
convolutions on (B, M * C, L), side by side in one process: a training step (forward, cross
entropy, backward) with each member on its own batch, and a validation pass with one batch for
all, at several stack sizes.

    python bench/stacked_conv.py [--members 6,18,54] [--threads 2] [--reps 7]

The default study's backbone (params.yaml's model section) on MNIST-1D's shape (1 x 40), the
fine-tuning batch (64) and the validation split's size (450); random data and weights: the
arithmetic does not depend on their values. The two formulations alternate within each
repetition, so a slow spell of the machine hits both; medians are printed, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import machine

from tasks.config.params import load_params
from tasks.models.classifier import Cnn1d, build_classifier
from tasks.models.shapes import architecture
from tasks.models.stacked import Weights, stacked_logits

INPUT = (1, 40)  # MNIST-1D: channels, length
CLASSES, VAL_EXAMPLES, CALLS = 5, 450, 20


def grouped_conv1d_logits(backbone: Cnn1d, weights: Weights, x: torch.Tensor) -> torch.Tensor:
    """The plain formulation: x (M, B, C, L) or (B, C, L) -> (M, B, K), every layer one grouped
    convolution on (B, M * C_i, L_i) (the first, on a shared input, one convolution with every
    member's filters)."""
    members = weights["head.weight"].shape[0]
    if x.dim() == 4:
        groups, h = members, x.transpose(0, 1).flatten(1, 2)
    else:
        groups, h = 1, x
    for i, block in enumerate(backbone.blocks):
        conv, prefix = block[0], f"backbone.blocks.{i}.0."
        weight, bias = weights[prefix + "weight"], weights[prefix + "bias"]
        h = F.conv1d(
            h,
            weight.flatten(0, 1),
            bias.flatten(),
            stride=conv.stride,
            padding=conv.padding,
            groups=groups,
        )
        h = F.relu(h)
        groups = members
    features = h.mean(-1).view(h.shape[0], members, -1).transpose(0, 1)
    return torch.baddbmm(
        weights["head.bias"].unsqueeze(1), features, weights["head.weight"].transpose(1, 2)
    )


def compare(members: int, arch: dict[str, Any], batch: int, reps: int) -> list[str]:
    """Both formulations at `members`, side by side: a line for the training step and one for
    validation."""
    models = [build_classifier(arch, CLASSES, seed) for seed in range(members)]
    weights = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        .clone()
        .requires_grad_()
        for name, _ in models[0].named_parameters()
    }
    template = models[0].to("meta")
    g = torch.Generator().manual_seed(members)
    x = torch.randn(members, batch, *INPUT, generator=g)  # each member its own batch
    y = torch.randint(0, CLASSES, (members, batch), generator=g)
    val = torch.randn(VAL_EXAMPLES, *INPUT, generator=g)  # one batch for all
    sides: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "grouped conv1d": lambda x: grouped_conv1d_logits(template.backbone, weights, x),
        "ours": lambda x: stacked_logits(template, weights, x),
    }

    def step(logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        loss = F.cross_entropy(logits(x).transpose(1, 2), y, reduction="none").sum()
        torch.autograd.grad(loss, list(weights.values()))

    def validate(logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        with torch.no_grad():
            logits(val).argmax(2)

    lines = []
    for name, work in (("training step", step), ("validation", validate)):
        for logits in sides.values():  # warm-up: oneDNN builds its kernels
            work(logits)
        times: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(reps):
            for side, logits in sides.items():
                started = time.perf_counter()
                for _ in range(CALLS):
                    work(logits)
                times[side].append((time.perf_counter() - started) / CALLS * 1e3)
        plain, ours = (statistics.median(times[side]) for side in sides)
        lines.append(
            f"{members:3d} members, {name}: grouped conv1d {plain:.2f} ms, ours {ours:.2f} ms: "
            f"{plain / ours:.2f}x"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="6,18,54", help="comma-separated stack sizes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params("params.yaml", [])
    batch = params.finetune.batch_size
    arch = architecture(params.model, INPUT)
    print(machine(args.threads))
    print(
        f"cnn1d channels {params.model.channels}, kernel {params.model.kernel_size}, input "
        f"{INPUT}; training batch {batch}, validation {VAL_EXAMPLES}; {CALLS} calls a timing"
    )
    for members in map(int, args.members.split(",")):
        print("\n".join(compare(members, arch, batch, args.reps)), flush=True)


if __name__ == "__main__":
    main()
