"""Samples per second of our training loop (`tasks.learning.train.fit`) beside a minimal bare
PyTorch loop, each with and without `torch.compile`, on the same model, data, batch size and
optimizer.

    python bench/train_step.py [--params params.yaml] [--samples 17500] [--epochs 3] [--reps 7]
    python bench/train_step.py --params params.text.yaml --samples 2000 --no-compile

With a text study's params, the inputs are random token ids of the study's length and
vocabulary, and the rates are also given in tokens per second (every position, padding
included: the encoder computes them all).

What is compared: the default params' backbone (`model` section, built by
`tasks.models.classifier` with its linear head) trained for the same number of epochs on the
same device-resident data (random inputs of MNIST-1D's shape; speed does not depend on the
values), batch size (`pretrain.batch_size`) and Adam learning rate, both drawing a fresh random
order each epoch from a seeded generator and batching by index. Neither side validates: `fit`
gets no validation split (so no early stopping, no weight copies), and the bare loop has none.
What `fit` adds per step is what the comparison prices (today: the autocast context, off on CPU;
the data-parallel shard's batch split and loss, trivial in one process; the on-device loss sum
and its one read per epoch). On CUDA both sides use bf16 autocast.

`torch.compile` (default inductor backend) is measured on both loops: its compile time is the
first (warm-up) epoch of the compiled model minus a steady compiled epoch, printed separately
(inductor caches compiled code on disk, in /tmp/torchinductor_<user>: a machine's first compile
takes several times longer than the later ones).

Every variant trains from the same initial weights in every repetition; the variants take turns
within a repetition (in a rotating order) so that a noisy neighbour slows all of them alike,
and the median over repetitions is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import machine
from torch import nn

from tasks.config.params import TrainParams, load_params
from tasks.learning.runtime import configure
from tasks.learning.train import DeviceData, fit
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture

Loop = Callable[[nn.Module, DeviceData, int, int, float], None]


def bare_loop(
    model: nn.Module, train: DeviceData, epochs: int, batch_size: int, lr: float
) -> None:
    """The classic loop on device-resident data: shuffle, slice, forward, backward, step."""
    device = train.y.device
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=order_rng).to(device)
        for start in range(0, len(train), batch_size):
            index = order[start : start + batch_size]
            with amp:
                loss = F.cross_entropy(model(train.x[index]), train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def our_loop(model: nn.Module, train: DeviceData, epochs: int, batch_size: int, lr: float) -> None:
    """`tasks.learning.train.fit` without a validation split: trains exactly `epochs` epochs."""
    schedule = TrainParams(max_epochs=epochs, patience=epochs, batch_size=batch_size)
    fit(model, [{"params": model.parameters(), "lr": lr}], train, None, schedule, seed=0)


def run_timed(
    loop: Loop, model: nn.Module, train: DeviceData, epochs: int, batch_size: int, lr: float
) -> float:
    """Seconds for `epochs` epochs of `loop` (a fresh optimizer each time)."""
    if train.y.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    loop(model, train, epochs, batch_size, lr)
    if train.y.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="model, batch size, lr, threads")
    parser.add_argument("--samples", type=int, default=17_500, help="training examples")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per variant")
    parser.add_argument("--batch-size", type=int, help="default: params' pretrain.batch_size")
    parser.add_argument("--threads", type=int, help="default: params' runtime.threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    args = parser.parse_args()
    params = load_params(args.params)
    runtime = params.runtime
    if args.threads is not None:
        runtime = runtime.model_copy(update={"threads": args.threads})
    device = configure(runtime)
    batch_size = args.batch_size or params.pretrain.batch_size
    lr = params.pretrain.lr

    classes = len(params.source.classes or range(10))
    data = torch.Generator().manual_seed(0)
    if params.model.backbone == "transformer":  # texts: token ids (N, max_tokens)
        input_shape, vocab = (params.text.max_tokens,), params.text.vocab_size
        arch = architecture(params.model, input_shape, {"vocab_size": vocab, "pad_id": 0})
        x = torch.randint(5, vocab, (args.samples, *input_shape), generator=data)
    else:
        input_shape = (1, 40)
        arch = architecture(params.model, input_shape)
        x = torch.randn(args.samples, *input_shape, generator=data)
    train = DeviceData(
        x.to(device), torch.randint(classes, (args.samples,), generator=data).to(device)
    )
    tokens = input_shape[0] if len(input_shape) == 1 else None  # per example, for texts
    model = build_classifier(arch, classes, seed=0).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())

    print(machine(torch.get_num_threads()) + f", device {device}")
    print(
        f"sizes: {arch['name']} {arch.get('channels', arch.get('hidden', arch.get('layers')))} "
        f"({n_params:,} "
        f"weights, {classes} classes), {args.samples:,} examples of shape {input_shape}, batch "
        f"{batch_size}, Adam lr {lr}, {args.epochs} epoch(s) per run, {args.reps} run(s) each"
    )

    def timed_run(loop: Loop, module: nn.Module, epochs: int) -> float:
        model.load_state_dict(initial)  # the compiled module shares these weights
        return run_timed(loop, module, train, epochs, batch_size, lr)

    variants: dict[str, tuple[Loop, nn.Module]] = {"bare": (bare_loop, model)}
    variants["ours (fit)"] = (our_loop, model)
    compile_s = None
    if not args.no_compile:
        compiled = torch.compile(model)
        compile_s = timed_run(bare_loop, compiled, 1) - timed_run(bare_loop, compiled, 1)
        variants["bare + compile"] = (bare_loop, compiled)
        variants["ours + compile"] = (our_loop, compiled)
    for loop, module in variants.values():  # untimed: first-call allocations, thread pools
        timed_run(loop, module, 1)

    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            loop, module = variants[name]
            times[name].append(timed_run(loop, module, args.epochs))

    rate = {name: args.epochs * args.samples / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        each = ", ".join(f"{args.epochs * args.samples / s:,.0f}" for s in t)
        per_token = f" ({rate[name] * tokens:,.0f} tokens/s)" if tokens else ""
        print(f"{name:>15}: median {rate[name]:>9,.0f} samples/s{per_token}  [{each}]")
    print(f"ours / bare: {rate['ours (fit)'] / rate['bare']:.3f}x  (goal: at least 0.97x)")
    if compile_s is not None:
        print(
            f"compile pays? bare + compile / bare: {rate['bare + compile'] / rate['bare']:.3f}x, "
            f"ours + compile / ours: {rate['ours + compile'] / rate['ours (fit)']:.3f}x; "
            f"compile time {compile_s:.1f} s (first epoch minus a steady one)"
        )


if __name__ == "__main__":
    main()
