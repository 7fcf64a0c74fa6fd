"""Samples per second of our training loop (`tasks.learning.train.fit`) beside a minimal bare
PyTorch loop, each with and without `torch.compile`, on the same model, data, batch size and
optimizer.

    python bench/train_step.py [--params params.yaml] [--samples 17500] [--epochs 3] [--reps 7]
    python bench/train_step.py --params params.text.yaml --samples 2000 --no-compile
    python bench/train_step.py --params params.images.yaml [--stage pretrain|finetune]

With a text study's params, the inputs are random token ids of the study's length and
vocabulary, and the rates are also given in tokens per second (every position, padding
included: the encoder computes them all).

With an image study's params (model.backbone timm), the inputs are random images of shape
(image.channels, *image.size), the rates are in images per second, and the defaults are smaller
(3,200 images, 1 epoch, 5 runs: about a minute per stage on 2 CPU cores). `--stage` picks the
section whose batch size, learning rate (finetune: the first of `lrs`) and augmentation are
used. With augmentation declared there, both loops are also timed augmenting every training
image with it: ours as the study does (`fit` with `Augmented(SUPERVISED, transform, seed)`: a
draw seeded per batch from the run's seed and the batch's key, under a lock, the process RNG's
state restored), the bare loop the simple way (`torch.manual_seed` per batch, then the composed
v2 transform on each image); the rates without augmentation are printed beside them, so one
sees what augmentation costs. The params' data files are not needed (nor read).

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
takes several times longer than the later ones). Image studies skip it unless `--compile` is
given (their runtime.compile is false; compiling the ResNet took 49 s with a cold inductor cache
on a 2-core CPU, 2 s with a warm one), and the compiled variants never augment.

Every variant trains from the same initial weights in every repetition; the variants take turns
within a repetition (in a rotating order) so that a noisy neighbour slows all of them alike,
and the median over repetitions is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from _common import machine
from torch import nn

from tasks.config.params import Params, TrainParams, load_params
from tasks.learning.runtime import configure
from tasks.learning.train import SUPERVISED, DeviceData, fit
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture

Loop = Callable[[nn.Module, DeviceData, int, int, float], None]

# per modality: (samples, epochs, reps) when not given
DEFAULT_SIZES = {"signal": (17_500, 3, 7), "text": (17_500, 3, 7), "image": (3_200, 1, 5)}


def read_params(path: str) -> Params:
    """The params file, validated. An image study's is read without `load_params`' checks
    that its data files exist and its model builds: a bench needs no data, and builds it below."""
    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and doc.get("model", {}).get("backbone") == "timm":
        return Params.model_validate(doc)
    return load_params(path)


def bare_loop(
    model: nn.Module,
    train: DeviceData,
    epochs: int,
    batch_size: int,
    lr: float,
    transform: nn.Module | None = None,
) -> None:
    """The classic loop on device-resident data: shuffle, slice, (augment,) forward, backward,
    step. With `transform`, each image of a batch is transformed with its own draw after
    seeding torch's generator for the batch."""
    device = train.y.device
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=order_rng).to(device)
        for start in range(0, len(train), batch_size):
            index = order[start : start + batch_size]
            x = train.x[index]
            if transform is not None:
                torch.manual_seed(epoch * len(train) + start)
                x = torch.stack([transform(image) for image in x])
            with amp:
                loss = F.cross_entropy(model(x), train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def our_loop(
    model: nn.Module,
    train: DeviceData,
    epochs: int,
    batch_size: int,
    lr: float,
    transform: nn.Module | None = None,
) -> None:
    """`tasks.learning.train.fit` without a validation split: trains exactly `epochs` epochs;
    with `transform`, through the objective that augments each training image."""
    schedule = TrainParams(max_epochs=epochs, patience=epochs, batch_size=batch_size)
    objective = SUPERVISED
    if transform is not None:
        from tasks.learning.augment import Augmented  # torchvision: for image studies only

        objective = Augmented(SUPERVISED, transform, seed=0)
    groups = [{"params": model.parameters(), "lr": lr}]
    fit(model, groups, train, None, schedule, seed=0, objective=objective)


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
    parser.add_argument(
        "--stage",
        choices=("pretrain", "finetune"),
        default="pretrain",
        help="the section whose batch size, lr (finetune: lrs[0]) and augmentation are used",
    )
    parser.add_argument(
        "--samples", type=int, help="training examples (default 17,500; images 3,200)"
    )
    parser.add_argument("--epochs", type=int, help="epochs per timed run (default 3; images 1)")
    parser.add_argument("--reps", type=int, help="timed runs per variant (default 7; images 5)")
    parser.add_argument("--batch-size", type=int, help="default: the stage's batch_size")
    parser.add_argument("--threads", type=int, help="default: params' runtime.threads")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="time the compiled variants (default: yes, but for images)",
    )
    args = parser.parse_args()
    params = read_params(args.params)
    modality = params.model.modality
    samples, epochs, reps = DEFAULT_SIZES[modality]
    args.samples, args.epochs = args.samples or samples, args.epochs or epochs
    args.reps = args.reps or reps
    use_compile = args.compile if args.compile is not None else modality != "image"
    runtime = params.runtime
    if args.threads is not None:
        runtime = runtime.model_copy(update={"threads": args.threads})
    device = configure(runtime)
    stage = params.pretrain if args.stage == "pretrain" else params.finetune
    batch_size = args.batch_size or stage.batch_size
    lr = params.pretrain.lr if args.stage == "pretrain" else params.finetune.lrs[0]
    transform = None
    if stage.augment:
        from tasks.learning.augment import build_augmentation  # torchvision: images only

        shape = (params.image.channels, *params.image.size)
        transform = build_augmentation(stage.augment, f"{args.stage}.augment", shape)

    classes = len(next(iter(params.sources.values())).classes or range(10))
    data = torch.Generator().manual_seed(0)
    if params.model.backbone == "transformer":  # texts: token ids (N, max_tokens)
        input_shape, vocab = (params.text.max_tokens,), params.text.vocab_size
        arch = architecture(params.model, input_shape, {"vocab_size": vocab, "pad_id": 0})
        x = torch.randint(5, vocab, (args.samples, *input_shape), generator=data)
    elif modality == "image":  # pixels in [0, 1] (N, C, H, W)
        input_shape = (params.image.channels, *params.image.size)
        arch = architecture(params.model, input_shape)
        x = torch.rand(args.samples, *input_shape, generator=data)
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

    unit = "images/s" if modality == "image" else "samples/s"
    print(machine(torch.get_num_threads()) + f", device {device}")
    if modality == "image":
        shape = f"timm {arch['architecture']} {arch['args']}"
    else:
        shape = f"{arch['name']} {arch.get('channels', arch.get('hidden', arch.get('layers')))}"
    print(
        f"sizes: {shape} "
        f"({n_params:,} "
        f"weights, {classes} classes), {args.samples:,} examples of shape {input_shape}, batch "
        f"{batch_size}, Adam lr {lr}, {args.epochs} epoch(s) per run, {args.reps} run(s) each"
    )
    if modality == "image" or args.stage != "pretrain":
        augment = " -> ".join(f"{k}{v}" for a in stage.augment for k, v in a.items())
        print(f"stage: {args.stage}; augmentation: {augment or 'none'}")

    def timed_run(loop: Loop, module: nn.Module, epochs: int) -> float:
        model.load_state_dict(initial)  # the compiled module shares these weights
        return run_timed(loop, module, train, epochs, batch_size, lr)

    variants: dict[str, tuple[Loop, nn.Module]] = {"bare": (bare_loop, model)}
    variants["ours (fit)"] = (our_loop, model)
    if transform is not None:
        variants["bare + augment"] = (functools.partial(bare_loop, transform=transform), model)
        variants["ours + augment"] = (functools.partial(our_loop, transform=transform), model)
    compile_s = None
    if use_compile:
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
        print(f"{name:>15}: median {rate[name]:>9,.0f} {unit}{per_token}  [{each}]")
    print(f"ours / bare: {rate['ours (fit)'] / rate['bare']:.3f}x  (goal: at least 0.97x)")
    if transform is not None:
        print(
            f"with augmentation: ours / bare: "
            f"{rate['ours + augment'] / rate['bare + augment']:.3f}x; augmenting keeps "
            f"{rate['bare + augment'] / rate['bare']:.3f}x of the bare rate, "
            f"{rate['ours + augment'] / rate['ours (fit)']:.3f}x of ours"
        )
    if compile_s is not None:
        print(
            f"compile pays? bare + compile / bare: {rate['bare + compile'] / rate['bare']:.3f}x, "
            f"ours + compile / ours: {rate['ours + compile'] / rate['ours (fit)']:.3f}x; "
            f"compile time {compile_s:.1f} s (first epoch minus a steady one)"
        )


if __name__ == "__main__":
    main()
