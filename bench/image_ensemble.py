"""Seconds per training step of M image classifiers (the image study's ResNet: timm resnet18 with
stage widths 16, 32, 64, 128, 28x28 grey images, batch 32, 5 classes) trained
as one vmapped ensemble (`tasks.learning.ensemble._Stack`, the fine-tuning grid's path for small
networks) against the same M trained one after another with plain `torch.optim.Adam` steps;
prints the ratio stacked / separate.

    python bench/image_ensemble.py [--members 6] [--steps 10] [--reps 5] [--threads 1]

The study's ResNet uses BatchNorm. `_Stack` does not run it; the script shows why, one line each:
- as it is, `_Stack` fails before any batch norm runs: its template module is on the meta device
  and it swaps in the members' parameters only, so the backbone's buffers (the pixel mean and
  std of `TimmBackbone`, the running statistics) stay meta: "RuntimeError: Tensor on device meta
  is not on the expected device cpu!";
- with real buffers shared by every member (one template on the CPU), torch.func.vmap refuses
  the in-place update of the running statistics: "RuntimeError: Batch norm got a batched tensor
  as input while the running_mean or running_var, which will be updated in place, were not
  batched."
So the comparison is timed on the stack's own step (`_Stack._logits`, autograd.grad,
`_Stack._adam_step`) with every member's buffers stacked beside its weights and handed to
`functional_call` (the one change `_Stack` would need), for two networks:
- "groupnorm": the same ResNet with `norm_layer=partial(timm.layers.GroupNorm, num_groups=4)`
  (no running statistics: what stacking would give if the normalisation allowed it). timm's
  `get_norm_layer` drops a partial's positional args, so `partial(nn.GroupNorm, 4)` fails
  (missing num_channels), and the string "groupnorm" means 32 groups, more than the first
  stage's 16 channels; "groupnorm1" (one group) is the only string form that builds;
- "batchnorm": the study's ResNet itself, its running statistics stacked per member too: vmap
  then updates each member's slice in place, which it accepts.

Both sides train the same starting weights on the same batches (members differ in seed, so in
weights and learning rate; each sees its own random images), then the script checks that the
stack's weights (and running statistics) equal the separate runs' and that vmap also runs the
no-grad evaluation (eval mode) with the inputs shared by every member, as `_Stack._evaluate`
does. The first step's gradients agree to float32 rounding (relative 3e-6 and 5e-6), but the
weights after 10 steps differ more than bench/text_ensemble.py's (6 members: 4e-3 for
groupnorm, 4e-2 for batchnorm, against 6e-5 for its text encoder with 2 members): Adam divides
each gradient by its own root mean square plus eps 1e-8, so for the few weights whose gradient
is near 1e-8 a rounding difference of 1e-9 becomes a tenth of a learning-rate step (after one
step, 1 to 4 weights per tensor differ by more than 1e-6; in float64 the first step's weights
agree to 1e-10), and the training amplifies it. As a yardstick the script also prints how far
the separate runs move with 2 intra-op threads instead of 1 (other summation orders): 6e-5 for
groupnorm, 5e-2 for batchnorm.

Measured (2-core AMD EPYC shared with other jobs, 1 thread, 6 members, 10 steps): stacked /
separate 0.94 to 0.98 for groupnorm, 0.91 to 0.99 for batchnorm (about 150 to 200 ms per step of
all six either way); with 2 members, 1.2 to 1.35: stacking about breaks even at 6 members.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from _common import machine
from torch.func import functional_call, vmap

from tasks.config.params import TrainParams
from tasks.learning.ensemble import Member, _Stack
from tasks.learning.train import DeviceData, autocast
from tasks.models.classifier import Classifier, build_classifier

CHANNELS, SIZE, BATCH, CLASSES, GROUPS = [16, 32, 64, 128], 28, 32, 5, 4


def arch(norm: str) -> dict[str, Any]:
    args: dict[str, Any] = {"channels": CHANNELS}
    if norm == "groupnorm":
        from timm.layers import GroupNorm  # timm's: num_channels first, as timm calls it

        args["norm_layer"] = partial(GroupNorm, num_groups=GROUPS)
    return {"name": "timm", "in_chans": 1, "architecture": "resnet18", "args": args}


def data(seed: int, n: int) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g)  # pixels in [0, 1]
    return DeviceData(x, torch.randint(0, CLASSES, (n,), generator=g))


class BufferedStack(_Stack):
    """`_Stack` with every member's buffers stacked like its weights, (M, *shape), and handed to
    `functional_call` beside them, so that a batch norm updates each member's running
    statistics in its own slice."""

    def __init__(self, members: list[Member], cfg: TrainParams):
        super().__init__(members, cfg)
        self.buffers = {
            name: torch.stack([dict(m.model.named_buffers())[name] for m in self.members])
            for name, _ in members[0].model.named_buffers()
        }

    def _logits(self, weights: dict, x: torch.Tensor) -> torch.Tensor:
        def one(w: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, (w, b), (xb,))

        dims = (
            0,
            0,
            None if x.dim() == self.pool_x.dim() else 0,
        )  # one batch for all, or each its own
        with autocast(self.device):
            return vmap(one, in_dims=dims)(weights, self.buffers, x).float()


def bare_stack_error(members: list[Member]) -> tuple[str, str]:
    """The errors of one stacked forward pass: `_Stack` as it is, then with real buffers shared
    by every member (its template moved off the meta device)."""
    errors = []
    for real_buffers in (False, True):
        stack = _Stack(members, TrainParams(batch_size=BATCH))
        if real_buffers:
            stack.template = copy.deepcopy(members[0].model)
        try:
            stack._logits(stack.weights, stack.examples(slice(0, BATCH))[0])
            errors.append("none: it runs")
        except Exception as err:  # the point: which error, in one line
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    return errors[0], errors[1]


def separate(members: list[Member], steps: int) -> list[Classifier]:
    """Each member alone: the same batches (in order, no shuffle) and plain Adam steps."""
    trained = []
    for m in members:
        net = copy.deepcopy(m.model).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=m.lr)
        for step in range(steps):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            loss = F.cross_entropy(net(m.train.x[batch]), m.train.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained.append(net)
    return trained


def stacked(members: list[Member], steps: int) -> BufferedStack:
    """The ensemble's own step (`_Stack._logits`, autograd.grad, `_adam_step`) on the same
    batches as `separate`."""
    stack = BufferedStack(members, TrainParams(batch_size=BATCH))
    stack.template.train()
    params = [stack.weights[name] for name in stack.trainable]
    for step in range(steps):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        x, y = stack.examples(batch)
        logits = stack._logits(stack.weights, x)  # (M, B, K)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        grads = torch.autograd.grad(losses.mean(1).sum(), params)
        stack._adam_step(len(members), params, list(grads))
    return stack


def first_gradients(members: list[Member]) -> float:
    """Max over members and parameters of |stacked - separate| / max |separate| of the first
    batch's gradients."""
    stack = BufferedStack(members, TrainParams(batch_size=BATCH))
    stack.template.train()
    params = [stack.weights[name] for name in stack.trainable]
    x, y = stack.examples(slice(0, BATCH))
    logits = stack._logits(stack.weights, x)
    losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    grads = torch.autograd.grad(losses.mean(1).sum(), params)
    by_name = dict(zip(stack.trainable, grads, strict=True))
    worst = 0.0
    for i, m in enumerate(members):
        net = copy.deepcopy(m.model).train()
        F.cross_entropy(net(m.train.x[:BATCH]), m.train.y[:BATCH]).backward()
        for name, p in net.named_parameters():
            scale = p.grad.abs().max().item() or 1.0
            worst = max(worst, (by_name[name][i] - p.grad).abs().max().item() / scale)
    return worst


def compare(norm: str, args: argparse.Namespace) -> float:
    """Check, then time, one network; returns the ratio stacked / separate."""
    val = data(args.members, BATCH)  # the stack's shared validation split (not scored here)
    members = [
        Member(
            build_classifier(arch(norm), CLASSES, seed),
            data(seed, args.steps * BATCH),
            val,
            lr=1e-3 * (1 + seed),
            seed=seed,
        )
        for seed in range(args.members)
    ]
    # correctness first: the same weights (and running statistics) after the same steps
    nets, stack = separate(members, args.steps), stacked(members, args.steps)
    weight_diff = max(
        (stack.weights[name][i] - p).abs().max().item()
        for i, net in enumerate(nets)
        for name, p in net.named_parameters()
    )
    buffer_diff = max(
        [
            (stack.buffers[name][i].double() - b.double()).abs().max().item()
            for i, net in enumerate(nets)
            for name, b in net.named_buffers()
        ],
        default=0.0,
    )
    # a yardstick of float rounding after as many steps: the separate runs with another number
    # of intra-op threads (other summation orders), against the first ones
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    others = separate(members, args.steps)
    torch.set_num_threads(threads)
    yardstick = max(
        (p - q).abs().max().item()
        for net, other in zip(nets, others, strict=True)
        for p, q in zip(net.parameters(), other.parameters(), strict=True)
    )
    with torch.no_grad():
        stack.template.eval()  # batch norms: the running statistics, as `evaluate` uses them
        shared = stack._logits(stack.weights, members[0].train.x[:BATCH])  # one batch for all
        alone = torch.stack([net.eval()(members[0].train.x[:BATCH]) for net in nets])
    n_params = sum(p.numel() for p in members[0].model.parameters())
    print(
        f"{norm} ({n_params:,} weights): first step's gradients, max |stack - separate| / "
        f"max |grad| {first_gradients(members):.1e}; after {args.steps} steps, max |stack - "
        f"separate| weight {weight_diff:.2e}, buffer {buffer_diff:.2e}, eval logits (shared "
        f"inputs) {(shared - alone).abs().max().item():.2e}; separate with "
        f"{2 if threads == 1 else 1} threads against {threads}: weight {yardstick:.2e}"
    )

    per_step: dict[str, list[float]] = {"separate": [], "stacked": []}
    for rep in range(args.reps):
        runs = (("separate", separate), ("stacked", stacked))
        for name, run in runs[rep % 2 :] + runs[: rep % 2]:  # take turns going first
            started = time.perf_counter()
            run(members, args.steps)
            per_step[name].append((time.perf_counter() - started) / args.steps)
    sep, st = (statistics.median(per_step[k]) for k in ("separate", "stacked"))
    print(
        f"{norm}: {args.members} members, one step of all: separate {sep * 1e3:.1f} ms, "
        f"stacked {st * 1e3:.1f} ms (median of {args.reps}); ratio stacked / separate: "
        f"{st / sep:.2f}"
    )
    return st / sep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(args.threads))
    stem = build_classifier(arch("batchnorm"), CLASSES, 0).backbone.net.conv1
    print(
        f"resnet18 widths {CHANNELS} (timm's default stem: "
        f"conv1 {stem.out_channels} wide, {stem.kernel_size[0]}x{stem.kernel_size[1]} stride "
        f"{stem.stride[0]}), {SIZE}x{SIZE} grey, batch {BATCH}, {CLASSES} classes, "
        f"{args.members} members, {args.steps} steps per run"
    )

    val = data(2, BATCH)  # the stack's shared validation split (not scored here)
    members = [
        Member(
            build_classifier(arch("batchnorm"), CLASSES, seed), data(seed, BATCH), val, 1e-3, seed
        )
        for seed in range(2)
    ]
    as_is, real_buffers = bare_stack_error(members)
    print(f"batchnorm, _Stack as it is: {as_is}")
    print(f"batchnorm, _Stack with real shared buffers: {real_buffers}")

    ratios = {norm: compare(norm, args) for norm in ("groupnorm", "batchnorm")}
    print(
        "ratio stacked / separate (buffers stacked per member): "
        + ", ".join(f"{norm} {ratio:.2f}" for norm, ratio in ratios.items())
    )


if __name__ == "__main__":
    main()
