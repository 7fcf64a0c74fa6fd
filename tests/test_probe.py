"""The linear probe: chooses its L2 strength on validation, never on test."""

from __future__ import annotations

import torch

from tasks.learning.probe import fit_probe


def blobs(n: int, seed: int, corrupt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs; `corrupt` relabels them and moves and rescales the features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    x = centres[y] + torch.randn(n, 4, generator=g)
    return (x * 50 + 7, 2 - y) if corrupt else (x, y)


def test_probe_separates_blobs_and_reports_each_strength() -> None:
    result = fit_probe(blobs(300, 0), blobs(100, 1), blobs(100, 2), 3, [1e-3, 1e-1, 10.0])
    assert result.test_acc > 0.9 and result.val_acc > 0.9
    assert set(result.val_acc_by_l2) == {1e-3, 1e-1, 10.0}
    assert result.val_acc == result.val_acc_by_l2[result.l2]
    x_test, y_test = blobs(100, 2)
    raw_predictions = (x_test @ result.weight.T + result.bias).argmax(1)
    # raw-space head; the accuracy is the exact count / N
    assert raw_predictions.eq(y_test).sum().item() / len(y_test) == result.test_acc


def test_the_test_split_does_not_change_the_choice() -> None:
    grid = [1e-4, 1e-2, 1.0, 100.0]
    honest = fit_probe(blobs(40, 0), blobs(60, 1), blobs(100, 2), 3, grid)
    scrambled = fit_probe(blobs(40, 0), blobs(60, 1), blobs(100, 2, corrupt=True), 3, grid)
    assert honest.l2 == scrambled.l2 and honest.val_acc_by_l2 == scrambled.val_acc_by_l2
    assert scrambled.test_acc < 0.5 < honest.test_acc  # only the reported number moved
