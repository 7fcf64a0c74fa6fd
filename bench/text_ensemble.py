"""Seconds per training step of M text classifiers (TextEncoder + linear head) trained as one
vmapped ensemble (`tasks.learning.ensemble._Stack`, the fine-tuning grid's path) against the same
M trained one after another with plain `torch.optim.Adam` steps; prints the ratio.

    python bench/text_ensemble.py [--members 6] [--steps 20] [--reps 5] [--threads 1]

Both sides train the same starting weights on the same batches (members differ in seed, so in
weights; each sees its own random token ids), then the script checks that the stack's weights
equal the separate runs' (float rounding apart) and that vmap also runs the no-grad evaluation
with the inputs shared by every member (in_dims (0, None)), as `_Stack._evaluate` does.
Model: width 64, 2 layers, 4 heads, ff 128, vocab 2000, 64 tokens, batch 32, 4 classes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from _common import machine

from tasks.config.params import TrainParams
from tasks.learning.ensemble import Member, _Stack
from tasks.learning.train import DeviceData
from tasks.models.classifier import Classifier, build_classifier

VOCAB, WIDTH, LAYERS, HEADS, FF, TOKENS, BATCH, CLASSES, PAD = 2000, 64, 2, 4, 128, 64, 32, 4, 0


def model(seed: int) -> Classifier:
    arch = {
        **{"name": "transformer", "vocab_size": VOCAB, "width": WIDTH, "layers": LAYERS},
        **{"heads": HEADS, "ff_width": FF, "max_tokens": TOKENS, "pad_id": PAD},
    }
    return build_classifier(arch, CLASSES, seed)


def data(seed: int, n: int) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, TOKENS), generator=g)  # (N, L)
    lengths = torch.randint(8, TOKENS + 1, (n, 1), generator=g)
    ids[torch.arange(TOKENS) >= lengths] = PAD  # padded at the end, as the tokenizer does
    return DeviceData(ids, torch.randint(0, CLASSES, (n,), generator=g))


def separate(members: list[Member], steps: int) -> list[Classifier]:
    """Each member alone: the same batches (in order, no shuffle) and plain Adam steps."""
    trained = []
    for m in members:
        net = copy.deepcopy(m.model)
        optimizer = torch.optim.Adam(net.parameters(), lr=m.lr)
        for step in range(steps):
            batch = slice(step * BATCH, (step + 1) * BATCH)
            loss = F.cross_entropy(net(m.train.x[batch]), m.train.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trained.append(net)
    return trained


def stacked(members: list[Member], steps: int) -> _Stack:
    """The ensemble's own step (`_Stack._logits`, autograd.grad, `_adam_step`) on the same
    batches as `separate`."""
    stack = _Stack(members, TrainParams(batch_size=BATCH))
    params = [stack.weights[name] for name in stack.trainable]
    for step in range(steps):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        x, y = stack.examples(batch)
        logits = stack._logits(stack.weights, x)  # (M, B, K)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        grads = torch.autograd.grad(losses.mean(1).sum(), params)
        stack._adam_step(len(members), params, list(grads))
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(args.threads))
    val = data(args.members, BATCH)  # the stack's shared validation split (not scored here)
    members = [
        Member(model(seed), data(seed, args.steps * BATCH), val, lr=1e-3 * (1 + seed), seed=seed)
        for seed in range(args.members)
    ]

    # correctness first: the same weights after the same steps, and vmap under no_grad
    nets, stack = separate(members, args.steps), stacked(members, args.steps)
    diff = max(
        (stack.weights[name][i] - p).abs().max().item()
        for i, net in enumerate(nets)
        for name, p in net.named_parameters()
    )
    with torch.no_grad():
        shared = stack._logits(stack.weights, members[0].train.x[:BATCH])  # one batch for all
        alone = torch.stack([net.eval()(members[0].train.x[:BATCH]) for net in nets])
    print(
        f"after {args.steps} steps: max |stack - separate| weight {diff:.2e}, "
        f"eval logits (shared inputs) {(shared - alone).abs().max().item():.2e}"
    )

    per_step = {"separate": [], "vmapped": []}
    for _ in range(args.reps):
        for name, run in (("separate", separate), ("vmapped", stacked)):
            started = time.perf_counter()
            run(members, args.steps)
            per_step[name].append((time.perf_counter() - started) / args.steps)
    sep, vm = (statistics.median(per_step[k]) for k in ("separate", "vmapped"))
    print(
        f"{args.members} members, one step of all: separate {sep * 1e3:.1f} ms, "
        f"vmapped {vm * 1e3:.1f} ms (median of {args.reps})"
    )
    print(f"ratio vmapped / separate: {vm / sep:.2f}")


if __name__ == "__main__":
    main()
