"""The transferability scores against values computed independently here (closed forms,
explicit loops, scipy), and the properties that make them useful."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from tasks.analysis.transferability import (
    RankAgreement,
    _log_evidence_per_class,
    h_score,
    kendall_tau,
    leep,
    logme,
    rank_agreement,
)

RTOL = 1e-6  # on LogME's evidence / N and on the H-score: the independent routes agree to ~1e-12


def labelled_features(
    n: int, d: int, k: int, separation: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features whose class means lie `separation` apart in scale (0: pure noise), and
    (N,) labels with every class present."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    means = separation * rng.normal(size=(k, d))
    return rng.normal(size=(n, d)) + means[labels], labels


def max_log_evidence_over_n(features: np.ndarray, y: np.ndarray) -> float:
    """max over (alpha, beta) of log N(y | 0, alpha^-1 F F^T + beta^-1 I) / N, from the closed
    form (slogdet and solve on the N x N covariance, no SVD), by Nelder-Mead over the logs."""
    n = len(y)

    def negative(log_alpha_beta: np.ndarray) -> float:
        log_alpha, log_beta = log_alpha_beta
        cov = np.exp(-log_alpha) * features @ features.T + np.exp(-log_beta) * np.eye(n)
        sign, logdet = np.linalg.slogdet(cov)
        assert sign > 0
        return 0.5 * (n * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y))

    result = optimize.minimize(
        negative,
        x0=[0.0, 0.0],
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 5000},
    )
    assert result.success
    return -result.fun / n


@pytest.mark.parametrize(
    ("n", "d", "k", "separation"),
    [(90, 8, 3, 0.7), (60, 20, 4, 0.7), (40, 100, 3, 0.7), (25, 25, 2, 0.7), (80, 10, 4, 0.0)],
    ids=["N>D", "N>D-more-classes", "N<D", "N=D", "noise"],
)
def test_logme_is_the_maximised_closed_form_evidence(
    n: int, d: int, k: int, separation: float
) -> None:
    # "noise": features without a bias column cannot even fit y's mean, and for classes 1 and 3
    # the maximum is the edge alpha -> inf (w = 0), which Nelder-Mead approaches by walking
    # log alpha up its plateau; classes 0 and 2 have a maximum inside
    features, labels = labelled_features(n, d, k, separation, seed=n + d)
    ours = _log_evidence_per_class(features, labels, k)
    expected = [max_log_evidence_over_n(features, (labels == c).astype(float)) for c in range(k)]
    np.testing.assert_allclose(ours, expected, rtol=RTOL)
    assert logme(features, labels, k) == pytest.approx(np.mean(expected), rel=RTOL)


def test_logme_takes_float32_features_and_rank_deficient_ones() -> None:
    features, labels = labelled_features(80, 6, 3, separation=0.7, seed=1)
    single = features.astype(np.float32)
    assert logme(single, labels, 3) == logme(single.astype(np.float64), labels, 3)
    # repeated columns leave F^T F singular although N > D. [A, A] [A, A]^T = 2 A A^T, which
    # alpha absorbs: the maximised evidence is that of A alone
    half = features[:, :3]
    doubled = np.concatenate([half, half], axis=1)
    expected = [max_log_evidence_over_n(doubled, (labels == c).astype(float)) for c in range(3)]
    np.testing.assert_allclose(_log_evidence_per_class(doubled, labels, 3), expected, rtol=RTOL)
    assert logme(doubled, labels, 3) == pytest.approx(logme(half, labels, 3), rel=RTOL)


def test_logme_of_all_zero_features_is_the_noise_only_evidence() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    n = len(labels)
    # y ~ N(0, beta^-1 I) alone, maximised at beta = N / |y|^2 = N / n_k
    expected = [0.5 * (np.log(n / count) - np.log(2 * np.pi) - 1) for count in (3, 2, 5)]
    np.testing.assert_allclose(_log_evidence_per_class(np.zeros((n, 4)), labels, 3), expected)


def test_logme_refuses_a_class_missing_from_the_labels() -> None:
    features, labels = labelled_features(30, 4, 2, separation=1.0, seed=0)
    with pytest.raises(ValueError, match="every class"):
        logme(features, labels, 3)


def test_h_score_is_the_trace_of_the_explicit_between_class_covariance() -> None:
    for n, d, k in [(200, 10, 4), (30, 50, 3)]:  # full rank, and D > N (the pseudo-inverse)
        features, labels = labelled_features(n, d, k, separation=1.0, seed=d)
        mean = features.mean(axis=0)
        # N-denominators here, N - 1 in the module: the denominator cancels in the trace
        within = sum(np.outer(row - mean, row - mean) for row in features) / n
        between = np.zeros((d, d))
        for c in range(k):
            members = features[labels == c]
            gap = members.mean(axis=0) - mean
            between += len(members) / n * np.outer(gap, gap)
        expected = np.trace(np.linalg.pinv(within, rcond=1e-10) @ between)
        assert h_score(features, labels) == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("score", ["logme", "h_score"])
def test_features_that_carry_the_labels_score_above_noise(score: str) -> None:
    informative, labels = labelled_features(150, 16, 4, separation=1.5, seed=3)
    noise = np.random.default_rng(4).normal(size=informative.shape)
    if score == "logme":
        assert logme(informative, labels, 4) > logme(noise, labels, 4)
    else:
        assert h_score(informative, labels) > 2 * h_score(noise, labels)


def leep_by_loops(theta: np.ndarray, labels: np.ndarray, k: int) -> float:
    theta = theta.astype(np.float64)
    n, z_count = theta.shape
    joint = [[0.0] * z_count for _ in range(k)]  # P(y, z)
    for i in range(n):
        for z in range(z_count):
            joint[labels[i]][z] += theta[i, z] / n
    marginal = [sum(joint[y][z] for y in range(k)) for z in range(z_count)]  # P(z)
    total = 0.0
    for i in range(n):
        expected = sum(
            joint[labels[i]][z] / marginal[z] * theta[i, z]
            for z in range(z_count)
            if marginal[z] > 0
        )
        total += math.log(expected)
    return total / n


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_leep_matches_explicit_loops() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 40)
    theta = softmax(rng.normal(size=(40, 6)) + 2 * np.eye(6)[labels])
    theta[:, 5] = 0.0  # a source class no example gives any probability: P(z) = 0
    theta /= theta.sum(axis=1, keepdims=True)
    assert leep(theta, labels, 3) == pytest.approx(leep_by_loops(theta, labels, 3), rel=1e-12)
    # float32 softmax outputs, rows summing to 1 only to float32 rounding
    single = theta.astype(np.float32)
    assert leep(single, labels, 3) == pytest.approx(leep_by_loops(single, labels, 3), rel=1e-9)


def test_leep_of_a_source_that_predicts_the_target_labels_is_zero() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0, 0, 3])
    assert leep(np.eye(4)[labels], labels, 4) == 0.0
    # relabelled (z = a permutation of y) it is as good: P(y | z) learns the mapping
    assert leep(np.eye(4)[[2, 0, 3, 1]][labels], labels, 4) == 0.0


def test_leep_of_an_informative_source_beats_uniform_outputs() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 4, 200)
    prior = np.bincount(labels, minlength=4) / len(labels)
    # uniform theta: P(y | z) = p(y) for every z, so LEEP = mean log p(y_i) = sum p(y) log p(y)
    uniform = np.full((200, 5), 0.2)
    assert leep(uniform, labels, 4) == pytest.approx(np.sum(prior * np.log(prior)), rel=1e-12)
    informative = softmax(rng.normal(size=(200, 5)) + 3 * np.eye(5)[labels])
    assert leep(informative, labels, 4) > leep(uniform, labels, 4) + 0.2


def test_leep_refuses_logits() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        leep(np.array([[2.0, 1.0], [0.5, 0.3]]), np.array([0, 1]), 2)


@pytest.mark.parametrize("ties", [False, True])
def test_kendall_tau_is_scipys_tau_b(ties: bool) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        if ties:
            x, y = rng.integers(0, 4, 15), rng.integers(0, 3, 15)
        else:
            x = rng.normal(size=15)
            y = x + rng.normal(size=15)
        expected = stats.kendalltau(x, y, variant="b").statistic
        assert kendall_tau(x.tolist(), y.tolist()) == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_is_nan_without_two_points_or_with_a_constant_side() -> None:
    assert math.isnan(kendall_tau([], []))
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(kendall_tau([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert kendall_tau([1.0, 2.0], [3.0, 1.0]) == -1.0


def monotone_ish(n: int = 12, seed: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.normal(size=n))
    return x, x + 0.5 * rng.normal(size=n)


def test_rank_agreement_is_reproducible_and_brackets_tau() -> None:
    x, y = monotone_ish()
    first = rank_agreement(x, y, seed=3)
    assert first == rank_agreement(x, y, seed=3)
    assert (first.low, first.high) != (
        rank_agreement(x, y, seed=4).low,
        rank_agreement(x, y, seed=4).high,
    )
    assert first.n == 12 and first.tau == kendall_tau(x, y)
    assert first.low <= first.tau <= first.high
    assert -1 <= first.low < first.high <= 1


def test_rank_agreement_is_the_percentile_bootstrap_of_resampled_pairs() -> None:
    x, y = monotone_ish()
    rows = np.random.default_rng(11).integers(0, len(x), size=(300, len(x)))
    taus = [stats.kendalltau(x[r], y[r], variant="b").statistic for r in rows]
    taus = [t for t in taus if not math.isnan(t)]
    low, high = np.percentile(taus, [5, 95])
    result = rank_agreement(x, y, confidence=0.9, resamples=300, seed=11)
    assert result.low == pytest.approx(low, abs=1e-12)
    assert result.high == pytest.approx(high, abs=1e-12)


def test_rank_agreement_of_concordant_points_is_one() -> None:
    x = [0.1, 0.4, 0.5, 0.9, 1.3]
    assert rank_agreement(x, [2.0, 3.0, 5.0, 8.0, 13.0]) == RankAgreement(1.0, 1.0, 1.0, 5)


def test_rank_agreement_needs_three_points_for_an_interval() -> None:
    two = rank_agreement([1.0, 2.0], [3.0, 4.0])
    assert two.tau == 1.0 and two.n == 2
    assert math.isnan(two.low) and math.isnan(two.high)
    constant = rank_agreement([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    assert math.isnan(constant.tau) and math.isnan(constant.low) and math.isnan(constant.high)
