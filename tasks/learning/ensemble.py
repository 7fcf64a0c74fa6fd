"""Many small training runs of one architecture, trained together as a vectorised ensemble.

The fine-tuning grid is hundreds of runs of one small network that differ in their strategy,
label subset, seed and learning rate. Run one after another, each step of each run pays the same
per-operation overhead for a few kilobytes of arithmetic. Here the members' weights are stacked
along a leading member axis and one forward and backward pass serves all of them per step:
written out as grouped convolutions and batched matrix products for cnn1d and mlp
(tasks/models/stacked.py), `vmap`ped over `torch.func.functional_call` for anything else.

Each member keeps everything a separate run has: its own starting weights, training subset, data
order (its own seeded generator, as in `tasks.learning.train.fit`), which parameters train, a
learning rate per parameter, Adam state and early stopping. So one stack holds a source's
network strategies (scratch, fine-tuning, LP-FT, partial) at every label budget:
- **Subsets of different sizes.** The members sit in the stack by their steps per epoch, most
  first; step s of an epoch runs the first members only, those whose epoch has a step s (a
  prefix of the stack: views, no copies). A member whose epoch is over takes no step, and its
  Adam step count, which sets its bias correction, is its own. Every epoch ends with every
  member's validation score at once.
- **Frozen parameters.** A parameter that some members freeze is stacked for all; the frozen
  members' gradient is zeroed (after weight decay), so their Adam moments stay zero, as a run
  that never trained it has none, and the update is zero: the weight never moves.
- **Early stopping.** A member whose patience runs out leaves the stack (its weights frozen at
  its best epoch), so the others run on without it.

The result equals what `tasks.learning.train.fit` gives for each member alone, up to float
rounding (tests/test_ensemble.py shows it); the rounding depends on the stack's size, so a
member's last bits change with the company it keeps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from tasks.config.params import TrainParams
from tasks.learning.train import (
    SUPERVISED,
    DeviceData,
    FitResult,
    Objective,
    autocast,
    eval_batch_size,
    fit,
)
from tasks.models.stacked import Weights, stackable, stacked_logits

# torch.optim.Adam's defaults, which `tasks.learning.train.fit` uses
BETAS, EPS = (0.9, 0.999), 1e-8
EVAL_MEMBER_EXAMPLES = 4096  # on CPU: validation examples x members in one forward pass


@dataclass(frozen=True)
class Member:
    """One run of the ensemble: what `fit` would be called with for it alone."""

    model: nn.Module  # starting weights; parameters with requires_grad False stay fixed
    train: DeviceData  # this run's training subset
    val: DeviceData  # what early stopping watches (the members of one stack share it)
    lr: float  # its learning rate, times `rates` per parameter
    seed: int  # its data order
    # each parameter's learning rate as a multiple of `lr` (discriminative rates); absent: 1
    rates: Mapping[str, float] = field(default_factory=dict)
    # what its batches feed the model: their labels, or augmented images (one after another
    # only: the stack trains on labels)
    objective: Objective = SUPERVISED


def fit_ensemble(
    members: list[Member], cfg: TrainParams, vectorise: bool = True
) -> list[tuple[FitResult, nn.Module]]:
    """Train every member as `tasks.learning.train.fit` would (Adam, early stopping on validation
    accuracy, ties to the lower loss, best epoch's weights kept) and return, in the members'
    order, each one's result and trained copy of its model. The members' models are not
    modified. `vectorise` True trains them all as one stack, which needs one architecture,
    one validation split and labels as targets; False runs them through `fit` one after another:
    where a member's step is bound by arithmetic, not overhead, stacking does not pay (a text
    encoder on CPU: 1.2x slower stacked, bench/text_ensemble.py)."""
    if not vectorise:
        return [_fit_alone(member, cfg) for member in members]
    return _Stack(members, cfg).fit()


def _fit_alone(member: Member, cfg: TrainParams) -> tuple[FitResult, nn.Module]:
    """One member through `fit`, with one Adam parameter group per learning-rate multiple."""
    model = copy.deepcopy(member.model).to(member.train.y.device)
    groups: dict[float, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(member.rates.get(name, 1.0), []).append(param)
    param_groups = [{"params": ps, "lr": member.lr * rate} for rate, ps in groups.items()]
    result = fit(
        model, param_groups, member.train, member.val, cfg, member.seed, objective=member.objective
    )
    return result, model


def _per_member(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """(M,) values as (M, 1, ..., 1): broadcast over each member's slice of `like` (M, ...)."""
    return torch.tensor(values, device=like.device).view(-1, *[1] * (like.dim() - 1))


class _Stack:
    """The members in lockstep epochs until each one stops; slot order: most steps first."""

    def __init__(self, members: list[Member], cfg: TrainParams):
        if any(member.objective is not SUPERVISED for member in members):
            raise ValueError("a stack trains on labels only; fit other objectives alone")
        if any(member.val is not members[0].val for member in members):
            raise ValueError("the members of a stack share one validation split")
        self.cfg, self.val = cfg, members[0].val
        batch = cfg.batch_size
        # slots by steps per epoch, most first (stable: ties keep the members' order)
        self.order_of = sorted(range(len(members)), key=lambda i: -len(members[i].train))
        self.members = [members[i] for i in self.order_of]
        self.device = members[0].train.y.device
        first = self.members[0].model
        # structure only: functional_call swaps in the stacked weights, so it holds no data
        self.template = copy.deepcopy(first).to("meta")
        # cnn1d and mlp: their stacked forward written out (tasks/models/stacked.py); any
        # other architecture through vmap
        self.written_out = stackable(first)
        names = [name for name, _ in first.named_parameters()]
        trains = [
            {n for n, p in m.model.named_parameters() if p.requires_grad} for m in self.members
        ]
        self.trainable = [name for name in names if any(name in t for t in trains)]
        self.weights: Weights = {
            name: torch.stack(
                [dict(m.model.named_parameters())[name].detach() for m in self.members]
            )
            .to(self.device)
            .requires_grad_(name in self.trainable)
            for name in names
        }
        # frozen for some members only: their gradient is zeroed, (M, 1, ..., 1) of 0 or 1
        self.masks = {
            name: _per_member([float(name in t) for t in trains], self.weights[name])
            for name in self.trainable
            if not all(name in t for t in trains)
        }
        self.lrs = {
            name: _per_member(
                [m.lr * m.rates.get(name, 1.0) for m in self.members],
                self.weights[name],
            )
            for name in self.trainable
        }
        self.exp_avg = {name: torch.zeros_like(self.weights[name]) for name in self.trainable}
        self.exp_avg_sq = {name: torch.zeros_like(self.weights[name]) for name in self.trainable}
        # each member's own step count, on the host in float64 (Adam's bias correction in
        # Python floats; MPS has no float64)
        self.adam_steps = torch.zeros(len(members), dtype=torch.float64)
        # the members' training sets, each distinct one once (members that share a subset
        # share its tensors), end to end: member i's example j is pool[offsets[i] + j]
        self.sizes = [len(m.train) for m in self.members]
        distinct = list({id(m.train): m.train for m in self.members}.values())
        starts = dict(zip(map(id, distinct), [0, *accumulate(map(len, distinct))], strict=False))
        self.pool_x = torch.cat([train.x for train in distinct])  # (sum of N, C, L)
        self.pool_y = torch.cat([train.y for train in distinct])  # (sum of N,)
        offsets = [starts[id(m.train)] for m in self.members]
        self.offsets = torch.tensor(offsets, device=self.device)  # (M,)
        longest = self.sizes[0]
        # per example: 1 / the size of its batch in its member's epoch, 0 past the member's end,
        # so a batch's weighted sum is its member's mean loss, as `fit` takes it   (M, N)
        position = torch.arange(longest)
        self.example_weight = torch.stack(
            [
                torch.where(
                    position < n, 1 / torch.clamp(n - position // batch * batch, max=batch), 0
                )
                for n in self.sizes
            ]
        ).to(self.device)
        self.order_rngs = [torch.Generator().manual_seed(m.seed) for m in self.members]
        self.active = list(range(len(members)))  # the slot of each row of the stack
        self.best = {name: w.detach().clone() for name, w in self.weights.items()}  # by slot
        self.best_score = [(-1.0, -float("inf"))] * len(members)  # (val acc, -val loss)
        self.best_epoch = [-1] * len(members)
        self.history: list[list[dict[str, float]]] = [[] for _ in members]
        self.epoch_ends: list[list[float]] = [[] for _ in members]

    def _logits(self, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        """x: (A, B, C, L), or (B, C, L): one batch for every member -> (A, B, K)."""
        with autocast(self.device):
            if self.written_out:
                return stacked_logits(self.template, weights, x).float()

            def one(w: Weights, xb: torch.Tensor) -> torch.Tensor:
                return functional_call(self.template, w, (xb,))

            shared = x.dim() == self.pool_x.dim()  # (B, C, L), as the pool's (N, C, L)
            return vmap(one, in_dims=(0, None if shared else 0))(weights, x).float()

    def examples(self, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active member's training examples `span` of its own set, in their order:
        x (A, B, C, L), y (A, B) (bench/text_ensemble.py and bench/image_ensemble.py step the
        stack on these)."""
        positions = torch.arange(span.start, span.stop, device=self.device)
        index = self.offsets[:, None] + positions  # (A, B) positions in the pool
        return self.pool_x[index], self.pool_y[index]

    def fit(self) -> list[tuple[FitResult, nn.Module]]:
        cfg = self.cfg
        for epoch in range(cfg.max_epochs):
            # early stopping, per member, by the rule `fit` applies at the start of an epoch
            self._keep([i for i in self.active if epoch - 1 - self.best_epoch[i] < cfg.patience])
            if not self.active:
                break
            train_loss = self._train_epoch()  # (A,)
            val_loss, val_correct = self._evaluate()  # (A,), (A,)
            # the one host sync of the epoch: every member's three numbers at once
            rows = torch.stack([train_loss, val_loss, val_correct], 1).tolist()
            ended = time.time()
            rows_improved, improved = [], []  # rows of the stack and slots of the improved
            for row, (i, (loss, v_loss, v_correct)) in enumerate(
                zip(self.active, rows, strict=True)
            ):
                v_acc = v_correct / len(self.val)  # an exact count / N in float64
                self.history[i].append({"train/loss": loss, "val/loss": v_loss, "val/acc": v_acc})
                self.epoch_ends[i].append(ended)
                if (v_acc, -v_loss) > self.best_score[i]:
                    self.best_score[i], self.best_epoch[i] = (v_acc, -v_loss), epoch
                    rows_improved.append(row)
                    improved.append(i)
            if improved:
                at, to = (torch.tensor(ix, device=self.device) for ix in (rows_improved, improved))
                for name, w in self.weights.items():
                    self.best[name].index_copy_(0, to, w.detach().index_select(0, at))
        results = [self._result(slot) for slot in range(len(self.members))]
        by_member = dict(zip(self.order_of, results, strict=True))
        return [by_member[i] for i in range(len(results))]

    def _keep(self, keep: list[int]) -> None:
        """Drop the slots not in `keep` from the stack: weights, Adam state, data, rates. The
        rows keep their order, so the stack stays sorted by steps per epoch."""
        if keep == self.active:
            return
        rows = torch.tensor(
            [self.active.index(i) for i in keep], dtype=torch.long, device=self.device
        )
        for state in (self.exp_avg, self.exp_avg_sq, self.lrs, self.masks):
            for name in state:
                state[name] = state[name].index_select(0, rows)
        self.weights = {
            name: w.detach().index_select(0, rows).requires_grad_(name in self.trainable)
            for name, w in self.weights.items()
        }
        self.offsets = self.offsets.index_select(0, rows)
        self.example_weight = self.example_weight.index_select(0, rows)
        self.adam_steps = self.adam_steps.index_select(0, rows.cpu())
        self.active = keep

    def _train_epoch(self) -> torch.Tensor:
        """One epoch for every active member; returns each one's mean training loss (A,)."""
        batch, sizes = self.cfg.batch_size, [self.sizes[i] for i in self.active]
        longest = sizes[0]
        # each member's permutation from its own generator: the order its own run would see,
        # padded with index 0 (weight 0) to the longest
        order = torch.zeros(len(sizes), longest, dtype=torch.long)
        for row, i in enumerate(self.active):
            order[row, : sizes[row]] = torch.randperm(sizes[row], generator=self.order_rngs[i])
        order = order.to(self.device)  # (A, N)
        order += self.offsets[:, None]  # positions in the pool   (A, N)
        loss_sum = torch.zeros(len(self.active), device=self.device)
        for start in range(0, longest, batch):
            taking = sum(size > start for size in sizes)  # the first rows: sizes descend
            index = order[:taking, start : start + batch]  # (T, B) positions in the pool
            weights = {name: w[:taking] for name, w in self.weights.items()}
            logits = self._logits(weights, self.pool_x[index])  # (T, B, K)
            # (T, B) per-example losses -> (T,) per-member means over their own batches: member
            # i's gradient comes from its own mean alone, as in its own run
            losses = F.cross_entropy(logits.transpose(1, 2), self.pool_y[index], reduction="none")
            share = self.example_weight[:taking, start : start + index.shape[1]]  # (T, B)
            losses = (losses * share).sum(1)
            params = [weights[name] for name in self.trainable]
            grads = torch.autograd.grad(losses.sum(), params)
            self._adam_step(taking, params, list(grads))
            taken = (share > 0).sum(1)  # the batch's size for each member
            loss_sum[:taking] += losses.detach() * taken
        return loss_sum / torch.tensor(sizes, device=self.device)

    @torch.no_grad()
    def _adam_step(
        self, taking: int, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """torch.optim.Adam's update (L2 weight decay added to the gradient, bias-corrected
        moments) of the stack's first `taking` rows, with learning rates and step counts per
        member: row i of each tensor is a member's."""
        (beta1, beta2), decay = BETAS, self.cfg.weight_decay
        self.adam_steps[:taking] += 1
        steps = self.adam_steps[:taking]
        correction1 = (1 - beta1**steps).to(self.device, torch.float32)  # (T,)
        correction2 = (1 - beta2**steps).sqrt().to(self.device, torch.float32)
        # per parameter: (T, 1, ..., 1), broadcast over its shape
        shapes = [(-1, *[1] * (param.dim() - 1)) for param in params]
        if decay:
            grads = torch._foreach_add(grads, params, alpha=decay)
        grads = [  # frozen members: no gradient, so no moment and no update
            grad * self.masks[name][:taking] if name in self.masks else grad
            for name, grad in zip(self.trainable, grads, strict=True)
        ]
        # one call per operation for all parameters, as torch.optim.Adam's foreach path
        exp_avgs = [self.exp_avg[name][:taking] for name in self.trainable]
        exp_avg_sqs = [self.exp_avg_sq[name][:taking] for name in self.trainable]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [correction2.view(shape) for shape in shapes])
        torch._foreach_add_(denoms, EPS)
        updates = torch._foreach_div(exp_avgs, denoms)
        step_sizes = [
            self.lrs[name][:taking] / correction1.view(shape)
            for name, shape in zip(self.trainable, shapes, strict=True)
        ]
        torch._foreach_mul_(updates, step_sizes)
        torch._foreach_sub_(params, updates)

    @torch.no_grad()
    def _evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active member's mean cross-entropy and count of correct predictions on the
        validation split: (A,), (A,). On CPU in chunks of about EVAL_MEMBER_EXAMPLES / A
        examples: every member's activations then stay small and in cache (54 members of the
        default cnn1d scored 450 examples in 46 ms in chunks of 75, 52 ms in one); on an
        accelerator in batches as `fit`'s, fewer launches."""
        data, active = self.val, len(self.active)
        on_cpu = self.device.type == "cpu"
        chunk = max(16, EVAL_MEMBER_EXAMPLES // active) if on_cpu else eval_batch_size(self.cfg)
        loss_sum = torch.zeros(active, device=self.device)
        correct = torch.zeros(active, device=self.device)
        for start in range(0, len(data), chunk):
            x, y = data.x[start : start + chunk], data.y[start : start + chunk]
            logits = self._logits(self.weights, x)  # (A, B, K)
            loss_sum += F.cross_entropy(
                logits.transpose(1, 2), y.expand(active, -1), reduction="none"
            ).sum(1)
            correct += (logits.argmax(2) == y).sum(1)
        return loss_sum / len(data), correct

    def _result(self, slot: int) -> tuple[FitResult, nn.Module]:
        model = copy.deepcopy(self.members[slot].model).to(self.device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.best[name][slot])
        acc, neg_loss = self.best_score[slot]
        result = FitResult(
            self.best_epoch[slot], acc, -neg_loss, self.history[slot], self.epoch_ends[slot]
        )
        return result, model
