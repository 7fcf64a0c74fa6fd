"""Transferability scores: cheap guesses, from a pretrained backbone's frozen features on a
target's labelled training examples, of how well that backbone will transfer to the target; and
the rank agreement (Kendall's tau-b with a bootstrap interval) that checks such guesses against
the gains the study measures.

- LogME: K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained Models
  for Transfer Learning", ICML 2021 (Algorithm 1; reference code github.com/thuml/LogME).
- H-score: Y. Bao, Y. Li, S.-L. Huang, L. Zhang, L. Zheng, A. Zamir, L. Guibas, "An
  Information-Theoretic Approach to Transferability in Task Transfer Learning", ICIP 2019.
- LEEP: C. V. Nguyen, T. Hassner, M. Seeger, C. Archambeau, "LEEP: A New Measure to Evaluate
  Transferability of Learned Representations", ICML 2020.
- Kendall's tau-b: M. G. Kendall, "The treatment of ties in ranking problems", Biometrika 1945;
  the interval is B. Efron's percentile bootstrap.

All of it is plain numpy in float64 and deterministic. The scores take the features as given: no
standardising, centring (beyond what a formula itself does) or bias column is added here, so a
caller that wants standardised features standardises them first, the same way for every
backbone it compares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# LogME's fixed-point iteration stops when alpha and beta both change by at most this, relative;
# the evidence is stationary at the fixed point, so its error is of the order of the square.
LOGME_TOLERANCE = 1e-10
# It typically converges in a few dozen steps (the reference code allows 11 with a 1e-3 stop);
# this cap only bounds the rare slow case, which then returns the evidence where it stopped.
LOGME_MAX_ITERATIONS = 1000
# LEEP's source outputs are probabilities: rows that do not sum to 1 within this are not (logits
# passed by mistake, say). Loose enough for float16/float32 softmax rounding.
PROBABILITY_TOLERANCE = 1e-3
# Kendall's tau over bootstrap resamples is computed a batch at a time: at most this many
# (resample, pair) cells in memory at once.
_PAIR_CELLS_PER_BATCH = 1 << 22


def _as_features(features: np.ndarray) -> np.ndarray:
    """`features` as a finite float64 (N, D) array (float32 from torch becomes float64)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), not of shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    return f


def _as_labels(labels: np.ndarray, n: int, num_classes: int | None = None) -> np.ndarray:
    """`labels` as an int64 (N,) array, checked against N examples and [0, num_classes)."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must be ({n},) to match the examples, not of shape {y.shape}")
    if y.dtype.kind not in "iub" and not (np.isfinite(y).all() and np.all(y == np.round(y))):
        raise ValueError("labels must be integers")
    y = y.astype(np.int64)
    if num_classes is not None and n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return y


def _log_evidence_per_class(
    features: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """LogME's maximised log evidence / N for each class's one-hot column: shape (num_classes,).

    For class k, y = 1[labels == k] (N,) is modelled as a Bayesian linear regression on the
    features F (N, D): w ~ N(0, alpha^-1 I_D), y | F, w ~ N(F w, beta^-1 I_N), so that the
    evidence is p(y | F, alpha, beta) = N(y | 0, alpha^-1 F F^T + beta^-1 I_N). It is maximised
    over (alpha, beta) by MacKay's fixed-point iteration, worked on the SVD of F as in the
    paper's Algorithm 1, for all classes at once.
    """
    f = _as_features(features)
    n, d = f.shape
    if n == 0:
        raise ValueError("LogME needs at least one example")
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    y_int = _as_labels(labels, n, num_classes)
    missing = np.flatnonzero(np.bincount(y_int, minlength=num_classes) == 0)
    if missing.size:
        # y_k = 0 would be fitted perfectly by zero noise: its evidence has no maximum
        raise ValueError(f"LogME needs every class among the labels; none of {missing.tolist()}")
    y = np.zeros((n, num_classes))
    y[np.arange(n), y_int] = 1.0  # (N, K): column k is class k's regression target

    # F = U S V^T with U (N, r), s (r,), keeping the r singular values above numerical rank
    # (numpy's matrix_rank cutoff). The other min(N, D) - r, and the D - min(N, D) that a wide
    # F (D > N) does not even have, are eigenvalues 0 of F^T F: each adds log(alpha) to
    # log|A| below, and nothing else, so they need no columns of U.
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    eps = np.finfo(np.float64).eps
    if s.size:
        keep = s > s[0] * max(n, d) * eps
        u, s = u[:, keep], s[keep]
    sigma = s**2  # (r,) the nonzero eigenvalues of F^T F, largest first
    x = u.T @ y  # (r, K): each target's coordinates along the left singular vectors
    x2 = x**2
    # (K,) what of y lies outside F's column space: no weight fits it, whatever alpha and beta
    outside = ((y - u @ x) ** 2).sum(axis=0)

    def fit(t: np.ndarray, x2: np.ndarray, outside: np.ndarray):
        # Posterior mean m = beta A^-1 F^T y with A = alpha I + beta F^T F; through the SVD,
        # V^T m = beta s x / (alpha + beta sigma) = s x / (sigma + t), t = alpha / beta (K,).
        # Returns, each (K,): gamma = sum beta sigma / (alpha + beta sigma), the effective
        # number of parameters; |m|^2 = sum sigma x^2 / (sigma + t)^2; and |F m - y|^2, F m - y
        # being -x t / (sigma + t) along U plus the part of y outside F's column space. Written
        # with the ratios in [0, 1] below, so that no t overflows them.
        fitted = sigma[:, None] / (sigma[:, None] + t)  # (r, K)
        left = t / (sigma[:, None] + t)  # (r, K): 1 - fitted, without the cancellation
        gamma = fitted.sum(axis=0)
        m2 = (fitted**2 * x2 / sigma[:, None]).sum(axis=0)
        residual2 = (left**2 * x2).sum(axis=0) + outside
        return gamma, m2, residual2

    alpha, beta = np.ones(num_classes), np.ones(num_classes)  # the paper's starting point
    active = np.arange(num_classes)
    for _ in range(LOGME_MAX_ITERATIONS):
        if not active.size:
            break
        a, b = alpha[active], beta[active]
        gamma, m2, residual2 = fit(a / b, x2[:, active], outside[active])
        # MacKay's updates: the stationarity conditions of the evidence, solved for alpha, beta
        with np.errstate(divide="ignore", invalid="ignore"):
            new_a, new_b = gamma / m2, (n - gamma) / residual2
        # When the evidence has no interior maximum, alpha or beta runs off to infinity. Such a
        # class stops at its last finite point, or once t is beyond every sigma by a factor
        # 1 / eps (w is 0 to rounding) or below them all by eps (no noise, to rounding); the
        # limits at those edges are taken below.
        finite = np.isfinite(new_a) & np.isfinite(new_b) & (new_a > 0) & (new_b > 0)
        new_a, new_b = np.where(finite, new_a, a), np.where(finite, new_b, b)
        t = new_a / new_b
        edge = ~finite
        if sigma.size:
            edge |= (t * eps > sigma[0]) | (t < sigma[-1] * eps)
        alpha[active], beta[active] = new_a, new_b
        moved = (np.abs(new_a - a) > LOGME_TOLERANCE * new_a) | (
            np.abs(new_b - b) > LOGME_TOLERANCE * new_b
        )
        active = active[moved & ~edge]

    # log evidence = N/2 log beta + D/2 log alpha - N/2 log 2pi - beta/2 |F m - y|^2
    #                - alpha/2 |m|^2 - 1/2 log|A|,
    # with log|A| = sum over all D eigenvalues of log(alpha + beta sigma_i), sigma_i = 0 beyond
    # the rank r. Then D/2 log alpha - 1/2 log|A| = -1/2 sum_{i<=r} log(1 + sigma_i / t): the
    # D - r zero eigenvalues cancel exactly against D/2 log alpha (both N > D and N <= D).
    t = alpha / beta
    _, m2, residual2 = fit(t, x2, outside)
    evidence = (
        n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual2
        - alpha / 2 * m2
        - 0.5 * np.log1p(sigma[:, None] / t).sum(axis=0)
    )
    # The edges. As alpha -> inf (w = 0: the features explain nothing; e.g. noise features, or
    # none at all), y is pure noise, and the evidence tends to its maximum over beta, reached
    # at beta = N / |y|^2. The maximum is either inside (where the iteration converged) or at
    # an edge, and both the point reached and each edge's limit are at most the maximum: the
    # larger of them is it.
    evidence = np.maximum(
        evidence, n / 2 * (np.log(n / (y**2).sum(axis=0)) - np.log(2 * np.pi) - 1)
    )
    if sigma.size == n:
        # F F^T has full rank N (so N <= D), and as beta -> inf the evidence tends to that of
        # y ~ N(0, alpha^-1 F F^T), largest at alpha = N / sum(x^2 / sigma).
        best_alpha = n / (x2 / sigma[:, None]).sum(axis=0)
        noise_free = (
            n / 2 * (np.log(best_alpha) - np.log(2 * np.pi) - 1) - 0.5 * np.log(sigma).sum()
        )
        evidence = np.maximum(evidence, noise_free)
    return evidence / n


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """LogME (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for
    Transfer Learning"), Algorithm 1: for each class k, a Bayesian linear regression of the
    one-hot column y_k on the features, with its evidence maximised over (alpha, beta) by the
    paper's fixed-point iteration on the SVD of the features; returns the mean over classes of
    (max log evidence / N). features (N, D), labels (N,) ints in [0, num_classes).

    Higher is better. The features are used as given (no standardising, no bias column). Every
    class must occur among the labels: an absent class's all-zero target has no finite maximum
    evidence (ValueError). The log of a density, so it can be positive. When N <= D and some
    examples share one feature vector (and label), the evidence grows without bound (slowly,
    as beta -> inf); what is returned is then the maximum that the iteration reaches inside.
    """
    return float(_log_evidence_per_class(features, labels, num_classes).mean())


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score (Bao et al., ICIP 2019, "An Information-Theoretic Approach to Transferability in
    Task Transfer Learning"): tr(cov(f)^+ cov(E[f | y])), with the pseudo-inverse. features
    (N, D), labels (N,).

    Higher is better. Both covariances divide by N - 1, as in the authors' reference code; the
    denominator cancels in the trace, so N would give the same score. The pseudo-inverse drops
    eigenvalues of cov(f) below max(N, D) * eps times the largest (numerical zeros: rank
    deficient features, or D >= N). The features are used as given (no standardising).
    """
    f = _as_features(features)
    n, d = f.shape
    if n < 2:
        raise ValueError("H-score needs at least two examples")
    y = _as_labels(labels, n)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    class_means = np.zeros((counts.size, d))  # (C, D): E[f | y] for each class present
    np.add.at(class_means, inverse, f)
    class_means /= counts[:, None]
    g = class_means[inverse]  # (N, D): each example's features replaced by its class's mean
    centred_f = f - f.mean(axis=0)
    centred_g = g - g.mean(axis=0)  # g's mean is f's, up to rounding
    cov_f = centred_f.T @ centred_f / (n - 1)  # (D, D)
    cov_g = centred_g.T @ centred_g / (n - 1)  # (D, D): the between-class covariance
    cov_f_pinv = np.linalg.pinv(cov_f, rcond=max(n, d) * np.finfo(np.float64).eps, hermitian=True)
    return float(np.einsum("ij,ji->", cov_f_pinv, cov_g))  # tr(cov_f^+ cov_g)


def leep(source_probs: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """LEEP (Nguyen et al., ICML 2020): source_probs (N, Z) the source classifier's softmax
    outputs on the target's examples (rows sum to 1), labels (N,) target labels; the empirical
    joint P(y, z), conditional P(y | z), and the mean log of the expected empirical prediction.

    At most 0 (higher is better): the average log-likelihood of the target labels under the
    classifier that maps the source's predicted distribution theta(x) over source labels z to
    target labels through P(y | z).
    """
    theta = np.asarray(source_probs, dtype=np.float64)
    if theta.ndim != 2:
        raise ValueError(f"source_probs must be (N, Z), not of shape {theta.shape}")
    n, _ = theta.shape
    if n == 0:
        raise ValueError("LEEP needs at least one example")
    if not np.isfinite(theta).all() or (theta < 0).any():
        raise ValueError("source_probs must be finite and non-negative")
    if np.abs(theta.sum(axis=1) - 1).max() > PROBABILITY_TOLERANCE:
        raise ValueError("source_probs rows must sum to 1 (softmax outputs, not logits)")
    y = _as_labels(labels, n, num_classes)
    # P(y, z) = 1/N sum_i theta(x_i)_z 1[y_i = y]: (K, Z), row y sums class y's probabilities
    joint = np.zeros((num_classes, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= n
    marginal = joint.sum(axis=0)  # (Z,) P(z)
    # P(y | z) = P(y, z) / P(z); a z that no example gives any probability has P(z) = 0, and
    # theta(x_i)_z = 0 for every i, so its (undefined) column never counts: set it to 0.
    conditional = np.divide(
        joint, marginal, out=np.zeros_like(joint), where=marginal > 0
    )  # (K, Z)
    # the expected empirical prediction of y_i: sum_z P(y_i | z) theta(x_i)_z, (N,); it is at
    # least theta(x_i)_z / (N P(z)) > 0 for any z with theta(x_i)_z > 0, so its log is finite
    expected = np.einsum("nz,nz->n", conditional[y], theta)
    return float(np.mean(np.log(expected)))


def _tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair: x, y (B, n) -> (B,), NaN where a row is constant.

    Over the pairs i < j: tau_b = (n_c - n_d) / sqrt((n_0 - n_1)(n_0 - n_2)), where
    n_c - n_d = sum sign(x_i - x_j) sign(y_i - y_j) and n_0 - n_1 (n_0 - n_2) counts the pairs
    not tied in x (in y) = sum |sign(x_i - x_j)| (|sign(y_i - y_j)|).
    """
    i, j = np.triu_indices(x.shape[1], k=1)
    sx = np.sign(x[:, i] - x[:, j])  # (B, n(n-1)/2)
    sy = np.sign(y[:, i] - y[:, j])
    concordance = (sx * sy).sum(axis=1)
    untied = np.sqrt(np.abs(sx).sum(axis=1) * np.abs(sy).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(untied > 0, concordance / untied, np.nan)


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one length, not {x.shape} and {y.shape}")
    return x, y


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (handles ties), NaN when fewer than 2 points or either side is constant.

    NaN too when any value is NaN. O(n^2) in time and memory, meant for a few hundred points.
    """
    x, y = _paired(x, y)
    if x.size < 2:
        return math.nan
    return float(_tau_b(x[None], y[None])[0])


@dataclass(frozen=True)
class RankAgreement:
    tau: float
    low: float
    high: float
    n: int  # points


def rank_agreement(
    x: Sequence[float],
    y: Sequence[float],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> RankAgreement:
    """tau-b with a percentile bootstrap interval over the points (resampling (x, y) pairs with
    replacement, with a numpy Generator seeded by `seed`, so the interval is reproducible);
    resamples whose tau is NaN (e.g. all one point) are dropped; NaN bounds when fewer than 3
    points.

    Also NaN bounds when every resample's tau is NaN (a constant side). The percentile
    interval need not contain `tau` on odd data; it does on any monotone-ish data.
    """
    x, y = _paired(x, y)
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie in (0, 1)")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    n = x.size
    tau = kendall_tau(x, y)
    if n < 3:
        return RankAgreement(tau, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    # all the indices first, so the interval does not depend on the batching below
    rows = rng.integers(0, n, size=(resamples, n))  # (resamples, n): each a resample's points
    batch = max(1, _PAIR_CELLS_PER_BATCH // (n * (n - 1) // 2))
    taus = np.concatenate(
        [_tau_b(x[part], y[part]) for part in np.split(rows, range(batch, resamples, batch))]
    )
    taus = taus[~np.isnan(taus)]
    if not taus.size:
        return RankAgreement(tau, math.nan, math.nan, n)
    low, high = np.quantile(taus, [(1 - confidence) / 2, (1 + confidence) / 2])
    return RankAgreement(tau, float(low), float(high), n)
