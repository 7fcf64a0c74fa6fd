"""Contrastive pretraining (SimCLR's NT-Xent): the views are seeded draws, the loss is the
paper's, training through `fit` learns, and the backbone it leaves is a better feature extractor
for MNIST-1D than a random one (the acceptance test)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.config.params import DatasetSpec, Mnist1dArgs, ModelParams, SplitParams, TrainParams
from tasks.data.datasets import Labelled
from tasks.data.sources import build_splits
from tasks.learning.contrastive import SELF_SIMILARITY, Contrastive, TwoViews
from tasks.learning.probe import fit_probe
from tasks.learning.train import DeviceData, evaluate, fit
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture

ARCH = architecture(ModelParams(), (1, 40))  # cnn1d, channels 32-32-32: MNIST-1D's backbone


def backbone(seed: int = 0) -> torch.nn.Module:
    return build_classifier(ARCH, 10, seed).backbone


def bumps(n: int, channels: int = 1, length: int = 40, seed: int = 0) -> torch.Tensor:
    """(n, channels, length) smooth signals: a Gaussian bump (sigma L/8) around a random point
    of a circle, channel k scaled by k + 1; examples differ by where their bump is."""
    g = torch.Generator().manual_seed(seed)
    distance = (torch.arange(length) - torch.rand(n, 1, generator=g) * length).abs()  # (n, L)
    distance = torch.minimum(distance, length - distance)
    bump = torch.exp(-0.5 * (distance / (length / 8)) ** 2)[:, None, :]  # (n, 1, L)
    return bump * torch.arange(1, channels + 1.0)[:, None]


def images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 12, 10) images in [0, 1], not square (the crop's aspect ratio is per pixel)."""
    return torch.rand(n, 3, 12, 10, generator=torch.Generator().manual_seed(seed))


def labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of a and b (..., L) along the last axis: (...)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Training on one intra-op thread, as the pipeline's default runtime does: the results
    depend on the thread count (tasks/learning/runtime.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist1d() -> dict[str, Labelled]:
    """4000 MNIST-1D examples of all 10 digits (the fast generator), in stratified splits:
    train 2800, val 600, test 600."""
    spec = DatasetSpec(kind="mnist1d", generator=Mnist1dArgs(num_samples=4000, engine="fast"))
    return build_splits(spec, SplitParams(val=0.15, test=0.15, seed=0), "source").splits


# --- views ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: bumps(6, channels=2), lambda: images(6)])
def test_views_repeat_for_a_key_and_pair_up(make) -> None:
    x, objective = make(), TwoViews(seed=3)
    (views,), positives = objective.inputs(x, labels(6), (0, 1, 128))
    assert views.shape == (12, *x.shape[1:]) and views.dtype == x.dtype
    assert positives.tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    (again,), _ = objective.inputs(x, labels(6), (0, 1, 128))
    assert torch.equal(views, again)  # the same seed and key: the same views, bit for bit
    (other_key,), _ = objective.inputs(x, labels(6), (0, 2, 128))
    (other_seed,), _ = TwoViews(seed=4).inputs(x, labels(6), (0, 1, 128))
    for other in (other_key, other_seed):
        assert not torch.isclose(views, other).flatten(1).all(1).any()  # every view moved
    assert not torch.isclose(views[:6], views[6:]).flatten(1).all(1).any()  # two views differ
    (ignoring_labels,), _ = objective.inputs(x, labels(6, seed=1), (0, 1, 128))
    assert torch.equal(views, ignoring_labels)


def test_signal_views_are_augmented_but_correlate_with_their_input() -> None:
    x = bumps(256, channels=2)
    (views,), _ = TwoViews(seed=0).inputs(x, labels(256), (0, 0, 0))
    for view in (views[:256], views[256:]):
        assert (view - x).abs().amax(dim=(1, 2)).min() > 0.1  # every example augmented
        own = correlation(view, x).mean()  # with its own input (shifted, stretched: not 1)
        others = correlation(view, x.roll(1, dims=0)).mean()  # with another example's
        assert own > 0.3 and others.abs() < 0.15, (own, others)
    # channels of one example are cropped and shifted alike: the bump stays in one place
    assert correlation(views[:, 0], views[:, 1]).min() > 0.9


def test_image_views_stay_in_the_unit_range_and_change_the_image() -> None:
    x = images(64)
    (views,), _ = TwoViews(seed=0).inputs(x, labels(64), (0, 0, 0))
    assert views.min() >= 0 and views.max() <= 1
    assert ((views[:64] - x).abs().mean(dim=(1, 2, 3)) > 0.01).all()


def test_other_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, L\) or \(B, C, H, W\)"):
        TwoViews(seed=0).inputs(torch.zeros(4, 40), labels(4), (0, 0, 0))


# --- the loss ------------------------------------------------------------------------------------


def nt_xent_of_the_paper(h: torch.Tensor, temperature: float) -> float:
    """SimCLR's loss, written as the paper writes it (Chen et al. 2020, eq. 1 and Algorithm 1):
    views 2k and 2k + 1 of its pairs are here k and k + N. For each anchor i of the 2N:
    -log(exp(sim(i, j) / t) / sum over k != i of exp(sim(i, k) / t)), sim the cosine of the
    projections h; averaged over all 2N anchors. In float64, one term at a time."""
    rows = h.double().tolist()
    two_n = len(rows)

    def sim(u: list[float], v: list[float]) -> float:
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    total = 0.0
    for i in range(two_n):
        j = (i + two_n // 2) % two_n  # the other view of the same example
        denominator = sum(
            math.exp(sim(rows[i], rows[k]) / temperature) for k in range(two_n) if k != i
        )
        total += -math.log(math.exp(sim(rows[i], rows[j]) / temperature) / denominator)
    return total / two_n


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_cross_entropy_of_the_logits_is_the_papers_nt_xent(temperature: float) -> None:
    model = Contrastive(backbone(seed=1), temperature, projection_dim=16, seed=2)
    (views,), positives = TwoViews(seed=0).inputs(bumps(10), labels(10), (0, 0, 0))
    logits = model(views)
    assert logits.shape == (20, 20) and (logits.diagonal() == SELF_SIMILARITY).all()
    loss = F.cross_entropy(logits, positives)
    with torch.no_grad():
        projections = model.projector(model.backbone(views))  # (20, 16), not normalised
    assert loss.item() == pytest.approx(nt_xent_of_the_paper(projections, temperature), abs=1e-5)
    # the masked diagonal is exactly out of the sum, and the loss and gradients are finite
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (logits.argmax(1) != torch.arange(20)).all()  # a view never retrieves itself


def test_projector_init_is_seeded_and_no_global_generator_is_touched() -> None:
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    first, second = (Contrastive(backbone(), 0.1, seed=5) for _ in range(2))
    other = Contrastive(backbone(), 0.1, seed=6)
    TwoViews(seed=0).inputs(bumps(8), labels(8), (0, 0, 0))
    TwoViews(seed=0).inputs(images(8), labels(8), (0, 0, 0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    for name, value in first.projector.state_dict().items():
        assert torch.equal(value, second.projector.state_dict()[name])
        assert not torch.equal(value, other.projector.state_dict()[name])
    # hidden width = the backbone's feature width; the output, projection_dim
    assert [tuple(layer.weight.shape) for layer in first.projector[::2]] == [(32, 32), (128, 32)]


# --- training ------------------------------------------------------------------------------------


def unlabelled(data: Labelled, n: int | None = None) -> DeviceData:
    """The first n examples with every label 0: contrastive training must not need them."""
    x = torch.from_numpy(data.x[:n])
    return DeviceData(x, torch.zeros(len(x), dtype=torch.int64))


def test_fit_trains_the_contrastive_objective(mnist1d, one_thread) -> None:
    cfg = TrainParams(max_epochs=5, patience=5, batch_size=128)
    train, val = unlabelled(mnist1d["train"]), unlabelled(mnist1d["val"], 256)
    histories = []
    for _ in range(2):
        model = Contrastive(backbone(seed=0), temperature=0.1, seed=0)
        groups = [{"params": model.parameters(), "lr": 3e-3}]
        result = fit(model, groups, train, val, cfg, seed=0, objective=TwoViews(seed=0))
        histories.append(result.history)
    history = histories[0]
    assert histories[1] == history  # seeded: the same run twice, the same numbers
    losses = [epoch["train/loss"] for epoch in history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.85 * losses[0], losses
    assert history[-1]["val/loss"] < history[0]["val/loss"]
    # val/acc: top-1 retrieval of the partner among the 511 other views; chance: 1/511 = 0.002,
    # measured: 0.033 after epoch 1, 0.125 after epoch 5
    assert result.best_val_acc > 0.05, history
    scores = evaluate(model, val, 1024, TwoViews(seed=0))  # the best epoch's weights, restored
    assert scores["acc"] == result.best_val_acc


# --- the acceptance test -------------------------------------------------------------------------


def probe_accuracy(net: torch.nn.Module, splits: dict[str, Labelled]) -> float:
    """Test accuracy of the linear probe on `net`'s frozen features: trained on 500 labelled
    examples of the train split, its L2 strength chosen on val, scored on test (neither of
    which contrastive pretraining saw)."""
    net.eval()
    with torch.no_grad():
        train, val, test = (
            (net(torch.from_numpy(splits[name].x[:n])), torch.from_numpy(splits[name].y[:n]))
            for name, n in (("train", 500), ("val", None), ("test", None))
        )
    return fit_probe(train, val, test, 10, [1e-3, 1e-2, 1e-1, 1.0]).test_acc


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_backbone_beats_a_random_one_under_a_linear_probe(
    mnist1d, one_thread, seed: int
) -> None:
    """The linear probe of the contrastive MNIST-1D backbone beats a random backbone's probe by
    a clear margin. Pretrained on the 2800 training signals without their labels, 40 epochs of
    batch 256 (~7 s on one core). Measured probe test accuracies, contrastive vs random:
    seed 0: 0.663 vs 0.375, 1: 0.628 vs 0.377, 2: 0.627 vs 0.403, 3: 0.583 vs 0.392,
    4: 0.623 vs 0.390, 5: 0.627 vs 0.412: margins of 19-29 points; asserted: 15."""
    random_acc = probe_accuracy(backbone(seed), mnist1d)
    model = Contrastive(backbone(seed), temperature=0.1, seed=seed)
    cfg = TrainParams(max_epochs=40, batch_size=256)
    groups = [{"params": model.parameters(), "lr": 3e-3}]
    train = unlabelled(mnist1d["train"])
    fit(model, groups, train, None, cfg, seed=seed, objective=TwoViews(seed=seed))
    contrastive_acc = probe_accuracy(model.backbone, mnist1d)
    assert contrastive_acc >= random_acc + 0.15, (contrastive_acc, random_acc)
