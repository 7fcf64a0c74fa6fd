"""The supervised training loop of one run: pretraining (on one or several processes), and the
reference that the fine-tuning ensemble (tasks/learning/ensemble.py) equals member by member.

Small data lives on the device and is batched by index; the loss is summed on the device and read
once per epoch, so the inner loop has no host-device sync. Early stopping watches validation
accuracy (ties go to the lower validation loss); without a validation split the run trains for
`max_epochs` and keeps its last weights. The test split never reaches this module.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tasks.config.params import TrainParams
from tasks.data.datasets import Labelled
from tasks.workspace import files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceData:
    x: torch.Tensor  # (N, C, L) float32 on the training device
    y: torch.Tensor  # (N,) int64 on the training device

    @classmethod
    def from_arrays(cls, data: Labelled, device: torch.device) -> DeviceData:
        return cls(torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device))

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FitResult:
    best_epoch: int  # 0-based; the model holds this epoch's weights
    best_val_acc: float
    best_val_loss: float
    history: list[dict[str, float]]  # one entry per epoch: train/loss, val/loss, val/acc
    epoch_ends: list[float] = field(default_factory=list)  # when each epoch ended (time.time())

    @property
    def score(self) -> tuple[float, float]:
        """What model selection maximises: validation accuracy, then lower validation loss."""
        return (self.best_val_acc, -self.best_val_loss)


def autocast(device: torch.device) -> torch.autocast:
    # bf16 autocast where it pays (CUDA); a no-op elsewhere so CPU results stay exact.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Objective(Protocol):
    """What a batch asks of the model: `inputs(x, y, key)` gives the model's arguments and the
    targets its logits (n, K) are scored against by cross-entropy. `key` (non-negative ints)
    names the batch, for objectives that draw at random: the same key, the same draw."""

    def inputs(
        self, x: torch.Tensor, y: torch.Tensor, key: tuple[int, ...]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]: ...


class Supervised:
    """Classification: the model's logits (B, K) for the examples against their labels (B,)."""

    def inputs(
        self, x: torch.Tensor, y: torch.Tensor, key: tuple[int, ...]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (x,), y


SUPERVISED = Supervised()
TRAIN_KEY, EVAL_KEY = 0, 1  # batch keys: (TRAIN_KEY, epoch, start) and (EVAL_KEY, start)


def eval_batch_size(cfg: TrainParams) -> int:
    """Validation's batch: large (no gradients), and fixed, since an MLM draw depends on it."""
    return max(cfg.batch_size, 1024)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: DeviceData, batch_size: int, objective: Objective = SUPERVISED
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over `data`'s targets (its labels, or the tokens an MLM
    objective masks: the same ones at every call); one host sync at the end."""
    model.eval()
    device = data.y.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        inputs, targets = objective.inputs(x, y, (EVAL_KEY, start))
        with autocast(x.device):
            logits = model(*inputs).float()  # (n, K)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
        count += len(targets)
    loss, hits, n = torch.stack([loss_sum, correct.double(), count.double()]).tolist()
    # the accuracy as an exact count / N in float64 (0.2733..., not float32's 0.27333334)
    return {"loss": loss / n, "acc": hits / n}


@dataclass(frozen=True)
class Shard:
    """This process's part of data-parallel training (torchrun, tasks/learning/distributed.py):
    rank `rank` of `world` processes. Every rank draws the same epoch order and takes every
    `world`-th example of each batch (what DistributedSampler does to the epoch, without its
    padding, which would repeat examples), so a step sees the single-process batch, split over
    the ranks. The default is the whole batch in this one process."""

    rank: int = 0
    world: int = 1

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,) indices of the global batch -> this rank's (about B / world,) share."""
        return batch if self.world == 1 else batch[self.rank :: self.world]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train through: DDP averages the ranks' gradients during backward()."""
        return DistributedDataParallel(model) if self.world > 1 else model

    def loss(self, logits: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's term of the mean cross-entropy over a global batch of `batch_size`.

        logits: (b, K), y: (b,), this rank's share. DDP divides the sum of the ranks' gradients
        by `world`, so each rank scales its sum by world / batch_size: the result is exactly the
        single-process gradient, for an uneven last batch too (where per-rank means would
        weight the examples of the smaller share more).
        """
        if self.world == 1:
            return F.cross_entropy(logits, y)  # the mean, as it was before sharding existed
        return F.cross_entropy(logits, y, reduction="sum") * (self.world / batch_size)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a (per-rank) tensor, in place."""
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object), on every rank."""
        if self.world == 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def agree(self, scores: dict[str, float], device: torch.device) -> dict[str, float]:
        """Rank 0's validation scores, on every rank. The ranks hold the same weights, so they
        should compute the same scores; taking rank 0's makes sure that all of them take the
        same early-stopping decision (a rank that stopped alone would leave the others waiting
        for its gradients forever)."""
        if self.world == 1:
            return scores
        values = torch.tensor(list(scores.values()), dtype=torch.float64, device=device)
        dist.broadcast(values, src=0)
        return dict(zip(scores, values.tolist(), strict=True))


@dataclass(frozen=True)
class Resume:
    """Where a run keeps its state after every epoch, and what must match to continue from it."""

    path: Path
    fingerprint: str  # of everything the result depends on: params, data, code version


def fit(
    model: nn.Module,
    param_groups: Iterable[dict],
    train: DeviceData,
    val: DeviceData | None,
    cfg: TrainParams,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    resume: Resume | None = None,
    shard: Shard = Shard(),
    compile_model: bool = False,
    objective: Objective = SUPERVISED,
) -> FitResult:
    """Train with Adam until validation accuracy stops improving for `cfg.patience` epochs, and
    keep the best epoch's weights; with `val` None, train `cfg.max_epochs` and keep the last.

    With `resume`, the full state (weights, optimizer, data-order RNG, best epoch, history) is
    written atomically after every epoch, and a rerun continues from the last complete epoch,
    ending with the same weights as an uninterrupted run.

    With a `shard` of several ranks, this process trains on its share of each batch and the
    ranks' gradients are averaged; rank 0 alone reads a saved state (and hands it to the
    others) and writes one. `compile_model` trains through `torch.compile(model)`. The
    `objective` says what a batch feeds the model and scores (default: its labels).
    """
    device = train.y.device
    if device.type == "cuda":  # 4-D weights (image convolutions) as bf16 cuDNN runs them fastest
        model.to(memory_format=torch.channels_last)  # in place: param_groups keep their tensors
    order_rng = torch.Generator().manual_seed(seed)  # this run's own data order
    optimizer = torch.optim.Adam(param_groups, weight_decay=cfg.weight_decay)
    best_score: tuple[float, float] = (-1.0, -float("inf"))  # (val acc, -val loss): maximise
    best_state, best_epoch, history, epoch_ends = None, -1, [], []
    # rank 0's saved state, on every rank: only rank 0 writes it, maybe on its own machine
    saved = shard.from_rank0(_load_state(resume) if shard.rank == 0 else None)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        order_rng.set_state(saved["order_rng"])
        best_score, best_epoch = tuple(saved["best_score"]), saved["best_epoch"]
        best_state, history = saved["best_state"], saved["history"]
        log.info("resuming from the end of epoch %d (%s)", len(history) - 1, resume.path)
    trained = shard.wrap(model)  # `model` itself in one process; shares its parameters
    if compile_model:  # compiled graphs share the parameters too; state dicts stay `model`'s
        trained = torch.compile(trained)
    amp = autocast(device)  # made once: making one costs as much as a small step's op
    for epoch in range(len(history), cfg.max_epochs):
        if val is not None and epoch - 1 - best_epoch >= cfg.patience:
            break  # early stopping: no better validation score for `patience` epochs
        trained.train()
        order = torch.randperm(len(train), generator=order_rng).to(device)  # same on all ranks
        loss_sum = torch.zeros((), device=device)  # of this rank's examples
        for start in range(0, len(train), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            index = shard.take(batch)
            inputs, targets = objective.inputs(
                train.x[index], train.y[index], (TRAIN_KEY, epoch, start)
            )
            with amp:
                logits = trained(*inputs).float()
            loss = shard.loss(logits, targets, len(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum.add_(loss.detach(), alpha=len(batch) / shard.world)

        metrics = {"train/loss": shard.total(loss_sum).item() / len(train)}
        if val is not None:
            scores = evaluate(model, val, eval_batch_size(cfg), objective)
            scores = shard.agree(scores, device)
            metrics |= {"val/loss": scores["loss"], "val/acc": scores["acc"]}
            if (scores["acc"], -scores["loss"]) > best_score:
                best_score, best_epoch = (scores["acc"], -scores["loss"]), epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(metrics)
        epoch_ends.append(time.time())
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if resume is not None and shard.rank == 0:
            files.torch_save(
                resume.path,
                {
                    "fingerprint": resume.fingerprint,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "order_rng": order_rng.get_state(),
                    "best_score": list(best_score),
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "history": history,
                },
            )
    if val is None:
        return FitResult(len(history) - 1, float("nan"), float("nan"), history, epoch_ends)
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best_score[0], -best_score[1], history, epoch_ends)


def _load_state(resume: Resume | None) -> dict | None:
    """The saved state if it belongs to this very run; a stale or unreadable one is ignored."""
    if resume is None or not resume.path.exists():
        return None
    try:
        state = torch.load(resume.path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: start over rather than fail
        log.warning("ignoring unreadable resume state %s (%s)", resume.path, err)
        return None
    if state.get("fingerprint") != resume.fingerprint:
        log.info("ignoring resume state %s: it belongs to other params or data", resume.path)
        return None
    return state
