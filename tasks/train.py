"""The one supervised training loop, shared by pretraining and every fine-tuning strategy.

Small data lives on the device and is batched by index; the loss is summed on the device and read
once per epoch, so the inner loop has no host-device sync. Early stopping watches validation
accuracy (ties go to the lower validation loss); without a validation split the run trains for
`max_epochs` and keeps its last weights. The test split never reaches this module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tasks.datasets import Labelled
from tasks.params import TrainParams


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

    @property
    def score(self) -> tuple[float, float]:
        """What model selection maximises: validation accuracy, then lower validation loss."""
        return (self.best_val_acc, -self.best_val_loss)


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 autocast where it pays (CUDA); a no-op elsewhere so CPU results stay exact.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy and accuracy over `data`; one host sync at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=data.y.device)
    correct = torch.zeros((), device=data.y.device, dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        with _autocast(x.device):
            logits = model(x).float()  # (B, K)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    loss, acc = (torch.stack([loss_sum, correct.float()]) / len(data)).tolist()
    return {"loss": loss, "acc": acc}


def fit(
    model: nn.Module,
    param_groups: Iterable[dict],
    train: DeviceData,
    val: DeviceData | None,
    cfg: TrainParams,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train with Adam until validation accuracy stops improving for `cfg.patience` epochs, and
    keep the best epoch's weights; with `val` None, train `cfg.max_epochs` and keep the last."""
    device = train.y.device
    order_rng = torch.Generator().manual_seed(seed)  # this run's own data order
    optimizer = torch.optim.Adam(param_groups, weight_decay=cfg.weight_decay)
    best_score: tuple[float, float] = (-1.0, -float("inf"))  # (val acc, -val loss): maximise
    best_state, best_epoch, history = None, -1, []
    for epoch in range(cfg.max_epochs):
        model.train()
        order = torch.randperm(len(train), generator=order_rng).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(train), cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            with _autocast(device):
                loss = F.cross_entropy(model(train.x[index]).float(), train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)

        metrics = {"train/loss": loss_sum.item() / len(train)}
        if val is not None:
            scores = evaluate(model, val, max(cfg.batch_size, 1024))
            metrics |= {"val/loss": scores["loss"], "val/acc": scores["acc"]}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if val is None:
            continue
        if (scores["acc"], -scores["loss"]) > best_score:
            best_score, best_epoch = (scores["acc"], -scores["loss"]), epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if val is None:
        return FitResult(len(history) - 1, float("nan"), float("nan"), history)
    model.load_state_dict(best_state)
    return FitResult(best_epoch, best_score[0], -best_score[1], history)
