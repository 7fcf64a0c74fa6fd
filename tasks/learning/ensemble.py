"""Many small training runs of one architecture, trained together as a vectorised ensemble.

The fine-tuning grid is hundreds of runs of one small network that differ only in their seed,
label subset and learning rate. Run one after another, each step of each run pays the same
per-operation overhead for a few kilobytes of arithmetic. Here the members' weights are stacked
along a leading member axis and one `vmap`ped forward and backward (`torch.func.functional_call`)
serves all of them per step.

Each member keeps everything a separate run has: its own starting weights, training subset, data
order (its own seeded generator, as in `tasks.learning.train.fit`), learning rate, Adam state
and early stopping. A member whose patience runs out leaves the stack (its weights frozen at its
best epoch), so the others run on without it. The result equals what `tasks.learning.train.fit`
gives for each member alone, up to float rounding (tests/test_ensemble.py shows it); the
rounding depends on the stack's size, so a member's last bits change with the company it keeps.
Members must share an architecture and which parameters train; members with training sets of
different sizes take different numbers of steps per epoch, so they train in separate stacks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from tasks.config.params import TrainParams
from tasks.learning.train import SUPERVISED, DeviceData, FitResult, Objective, autocast, fit

# torch.optim.Adam's defaults, which `tasks.learning.train.fit` uses
BETAS, EPS = (0.9, 0.999), 1e-8

Weights = dict[str, torch.Tensor]  # parameter name -> (M, *shape): one slice per member


@dataclass(frozen=True)
class Member:
    """One run of the ensemble: what `fit` would be called with for it alone."""

    model: nn.Module  # starting weights; parameters with requires_grad False stay fixed
    train: DeviceData  # this run's training subset
    lr: float  # its learning rate, scaled per parameter by `lr_scale`
    seed: int  # its data order
    # what its batches feed the model: their labels, or augmented images (one after another
    # only: the stack trains on labels)
    objective: Objective = SUPERVISED


def fit_ensemble(
    members: list[Member],
    val: DeviceData,
    cfg: TrainParams,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
    vectorise: bool = True,
) -> list[tuple[FitResult, nn.Module]]:
    """Train every member as `tasks.learning.train.fit` would (Adam, early stopping on validation
    accuracy, ties to the lower loss, best epoch's weights kept) and return, in the members'
    order, each one's result and trained copy of its model. The members' models are not
    modified. `lr_scale(name)` multiplies a member's lr for the parameter `name` (discriminative
    learning rates). `vectorise` False runs them through `fit` one after another instead: where
    a member's step is bound by arithmetic, not overhead, stacking does not pay (a text
    encoder on CPU: 1.2x slower stacked, bench/text_ensemble.py)."""
    if not vectorise:
        return [_fit_alone(member, val, cfg, lr_scale) for member in members]
    results: dict[int, tuple[FitResult, nn.Module]] = {}
    by_size = sorted(range(len(members)), key=lambda i: len(members[i].train))
    for _, group in groupby(by_size, key=lambda i: len(members[i].train)):
        indices = list(group)
        stack = _Stack([members[i] for i in indices], cfg, lr_scale)
        for i, outcome in zip(indices, stack.fit(val), strict=True):
            results[i] = outcome
    return [results[i] for i in range(len(members))]


def _fit_alone(
    member: Member, val: DeviceData, cfg: TrainParams, lr_scale: Callable[[str], float]
) -> tuple[FitResult, nn.Module]:
    """One member through `fit`, with one Adam parameter group per learning-rate scale."""
    model = copy.deepcopy(member.model).to(member.train.y.device)
    groups: dict[float, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(lr_scale(name), []).append(param)
    param_groups = [{"params": ps, "lr": member.lr * scale} for scale, ps in groups.items()]
    result = fit(
        model, param_groups, member.train, val, cfg, seed=member.seed, objective=member.objective
    )
    return result, model


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


class _Stack:
    """Members with training sets of one size, trained in lockstep until each one stops."""

    def __init__(self, members: list[Member], cfg: TrainParams, lr_scale: Callable[[str], float]):
        if any(member.objective is not SUPERVISED for member in members):
            raise ValueError("a stack trains on labels only; fit other objectives alone")
        self.members, self.cfg = members, cfg
        first = members[0].model
        self.device = members[0].train.y.device
        # structure only: functional_call swaps in the stacked weights, so it holds no data
        self.template = copy.deepcopy(first).to("meta")
        self.trainable = _trainable(first)
        if any(_trainable(m.model) != self.trainable for m in members):
            raise ValueError("ensemble members train different parameters; stack them apart")
        self.weights: Weights = {
            name: torch.stack([dict(m.model.named_parameters())[name].detach() for m in members])
            .to(self.device)
            .requires_grad_(name in self.trainable)
            for name, _ in first.named_parameters()
        }
        self.x = torch.stack([m.train.x for m in members])  # (M, N, C, L)
        self.y = torch.stack([m.train.y for m in members])  # (M, N)
        lrs = torch.tensor([m.lr for m in members], device=self.device)  # (M,)
        # per trainable parameter: (M, 1, ..., 1), broadcast over that parameter's shape
        self.lrs = {
            name: (lrs * lr_scale(name)).view(-1, *[1] * (self.weights[name].dim() - 1))
            for name in self.trainable
        }
        self.exp_avg = {name: torch.zeros_like(self.weights[name]) for name in self.trainable}
        self.exp_avg_sq = {name: torch.zeros_like(self.weights[name]) for name in self.trainable}
        self.order_rngs = [torch.Generator().manual_seed(m.seed) for m in members]
        self.active = list(range(len(members)))  # member index of each slice of the stack
        self.best = {name: w.detach().clone() for name, w in self.weights.items()}  # by member
        self.best_score = [(-1.0, -float("inf"))] * len(members)  # (val acc, -val loss)
        self.best_epoch = [-1] * len(members)
        self.history: list[list[dict[str, float]]] = [[] for _ in members]
        self.epoch_ends: list[list[float]] = [[] for _ in members]
        self.steps = 0

    def _logits(self, weights: Weights, x: torch.Tensor, shared_x: bool) -> torch.Tensor:
        """x: (M, B, C, L), or (B, C, L) for all members when `shared_x` -> (M, B, K)."""

        def one(w: Weights, xb: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, w, (xb,))

        with autocast(self.device):
            return vmap(one, in_dims=(0, None if shared_x else 0))(weights, x).float()

    def fit(self, val: DeviceData) -> list[tuple[FitResult, nn.Module]]:
        cfg = self.cfg
        for epoch in range(cfg.max_epochs):
            # early stopping, per member, by the rule `fit` applies at the start of an epoch
            self._keep([i for i in self.active if epoch - 1 - self.best_epoch[i] < cfg.patience])
            if not self.active:
                break
            train_loss = self._train_epoch()  # (A,)
            val_loss, val_correct = self._evaluate(val, max(cfg.batch_size, 1024))  # (A,), (A,)
            # the one host sync of the epoch: every member's three numbers at once
            rows = torch.stack([train_loss, val_loss, val_correct], 1).tolist()
            ended = time.time()
            slots, improved = [], []  # stack positions and member indices of the improved
            for slot, (i, (loss, v_loss, v_correct)) in enumerate(
                zip(self.active, rows, strict=True)
            ):
                v_acc = v_correct / len(val)  # an exact count / N in float64
                self.history[i].append({"train/loss": loss, "val/loss": v_loss, "val/acc": v_acc})
                self.epoch_ends[i].append(ended)
                if (v_acc, -v_loss) > self.best_score[i]:
                    self.best_score[i], self.best_epoch[i] = (v_acc, -v_loss), epoch
                    slots.append(slot)
                    improved.append(i)
            if improved:
                at, to = (torch.tensor(ix, device=self.device) for ix in (slots, improved))
                for name, w in self.weights.items():
                    self.best[name].index_copy_(0, to, w.detach().index_select(0, at))
        return [self._result(i) for i in range(len(self.members))]

    def _keep(self, keep: list[int]) -> None:
        """Drop the members not in `keep` from the stack: weights, Adam state, data, lrs."""
        if keep == self.active:
            return
        slots = torch.tensor(
            [self.active.index(i) for i in keep], dtype=torch.long, device=self.device
        )
        for state in (self.exp_avg, self.exp_avg_sq, self.lrs):
            for name in state:
                state[name] = state[name].index_select(0, slots)
        self.weights = {
            name: w.detach().index_select(0, slots).requires_grad_(name in self.trainable)
            for name, w in self.weights.items()
        }
        self.x, self.y = self.x.index_select(0, slots), self.y.index_select(0, slots)
        self.active = keep

    def _train_epoch(self) -> torch.Tensor:
        """One epoch for every active member; returns each one's mean training loss (A,)."""
        n, batch = self.y.shape[1], self.cfg.batch_size
        # each member's permutation from its own generator: the order its own run would see
        order = torch.stack([torch.randperm(n, generator=self.order_rngs[i]) for i in self.active])
        order = order.to(self.device)  # (A, N)
        rows = torch.arange(len(self.active), device=self.device)[:, None]  # (A, 1)
        loss_sum = torch.zeros(len(self.active), device=self.device)
        params = [self.weights[name] for name in self.trainable]
        for start in range(0, n, batch):
            index = order[:, start : start + batch]  # (A, B)
            logits = self._logits(self.weights, self.x[rows, index], shared_x=False)  # (A, B, K)
            # (A, B) per-example losses -> (A,) per-member means: member i's gradient comes
            # from its own mean alone, as in its own run
            losses = F.cross_entropy(logits.transpose(1, 2), self.y[rows, index], reduction="none")
            losses = losses.mean(1)
            grads = torch.autograd.grad(losses.sum(), params)
            self._adam_step(params, list(grads))
            loss_sum += losses.detach() * index.shape[1]
        return loss_sum / n

    @torch.no_grad()
    def _adam_step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """torch.optim.Adam's update (L2 weight decay added to the gradient, bias-corrected
        moments), with a learning rate per member: slice i of each tensor is member i's."""
        self.steps += 1
        (beta1, beta2), decay = BETAS, self.cfg.weight_decay
        correction1, correction2 = 1 - beta1**self.steps, (1 - beta2**self.steps) ** 0.5
        for name, param, grad in zip(self.trainable, params, grads, strict=True):
            if decay:
                grad = grad.add(param, alpha=decay)
            self.exp_avg[name].lerp_(grad, 1 - beta1)
            self.exp_avg_sq[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (self.exp_avg_sq[name].sqrt() / correction2).add_(EPS)
            param.sub_(self.lrs[name] / correction1 * self.exp_avg[name] / denom)

    @torch.no_grad()
    def _evaluate(self, data: DeviceData, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active member's mean cross-entropy and count of correct predictions on `data`:
        (A,), (A,)."""
        loss_sum = torch.zeros(len(self.active), device=self.device)
        correct = torch.zeros(len(self.active), device=self.device)
        for start in range(0, len(data), batch_size):
            x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
            logits = self._logits(self.weights, x, shared_x=True)  # (A, B, K)
            loss_sum += F.cross_entropy(
                logits.transpose(1, 2), y.expand(len(self.active), -1), reduction="none"
            ).sum(1)
            correct += (logits.argmax(2) == y).sum(1)
        return loss_sum / len(data), correct

    def _result(self, i: int) -> tuple[FitResult, nn.Module]:
        model = copy.deepcopy(self.members[i].model).to(self.device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.best[name][i])
        acc, neg_loss = self.best_score[i]
        result = FitResult(self.best_epoch[i], acc, -neg_loss, self.history[i], self.epoch_ends[i])
        return result, model
