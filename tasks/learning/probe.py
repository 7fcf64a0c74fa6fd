"""The linear probe: L2-regularised multinomial logistic regression on frozen features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeResult:
    l2: float  # the regularisation strength chosen on validation
    val_acc: float
    val_loss: float  # mean cross-entropy of the chosen classifier on validation
    test_acc: float
    val_acc_by_l2: dict[float, float]
    weight: torch.Tensor  # (K, D): the chosen classifier, on raw (unstandardised) features
    bias: torch.Tensor  # (K,)


def _accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return (x @ weight.T + bias).argmax(1).eq(y).sum().item() / len(y)  # exact, in float64


def _minimise(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
) -> None:
    """Mean cross-entropy + l2/2 |W|^2 by L-BFGS, in place, from the current weights."""
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def fit_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    l2_grid: list[float],
) -> ProbeResult:
    """Solve the convex problem with L-BFGS for each strength (strongest first, each solution
    warm-starting the next), choose the strength on validation, score the choice on test.

    x: (N, D) features, y: (N,) labels; the test split is scored once, after the choice.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    # Standardise by the training subset's statistics (never val's or test's): L-BFGS and one
    # L2 strength for all features then behave the same whatever the features' scales.
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
    weight = torch.zeros(num_classes, x_train.shape[1], requires_grad=True)  # (K, D)
    bias = torch.zeros(num_classes, requires_grad=True)  # (K,)
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    scores = {}
    for l2 in sorted(l2_grid, reverse=True):
        _minimise(weight, bias, x_train, y_train, l2)
        with torch.no_grad():
            scores[l2] = _accuracy(weight, bias, x_val, y_val)
            if best is None or scores[l2] > best[1]:
                best = (l2, scores[l2], weight.detach().clone(), bias.detach().clone())
    l2, val_acc, best_weight, best_bias = best
    test_acc = _accuracy(best_weight, best_bias, x_test, y_test)
    val_loss = F.cross_entropy(x_val @ best_weight.T + best_bias, y_val).item()
    # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m): the same classifier on raw features
    raw_weight = best_weight / std
    raw_bias = best_bias - raw_weight @ mean
    return ProbeResult(l2, val_acc, val_loss, test_acc, scores, raw_weight, raw_bias)
