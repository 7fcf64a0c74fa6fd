"""The written-out stacked forward pass gives each member what its own model gives."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.config.params import ModelParams
from tasks.models.classifier import build_classifier
from tasks.models.shapes import architecture
from tasks.models.stacked import stackable, stacked_logits


@pytest.mark.parametrize("backbone", ["cnn1d", "mlp"])
@pytest.mark.parametrize("shared", [False, True])
def test_stacked_logits_equal_each_members_model(backbone: str, shared: bool) -> None:
    # 2 channels of odd length: padding and striding at the edges, a flattened mlp input
    arch = architecture(ModelParams(backbone=backbone, channels=[5, 7], hidden=[9, 6]), (2, 23))
    models = [build_classifier(arch, 4, seed) for seed in range(3)]
    weights = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        for name, _ in models[0].named_parameters()
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 2, 23, generator=g) if shared else torch.randn(3, 11, 2, 23, generator=g)
    template = models[0].to("meta")
    assert stackable(template)

    logits = stacked_logits(template, weights, x)

    assert logits.shape == (3, 11, 4)
    for i, model in enumerate(build_classifier(arch, 4, seed) for seed in range(3)):
        with torch.no_grad():
            expected = model(x if shared else x[i])
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "model",
    [
        ModelParams(backbone="cnn1d", channels=[5, 7], kernel_size=5),
        ModelParams(backbone="cnn1d", channels=[5], kernel_size=3),  # the first layer alone
        ModelParams(backbone="mlp", hidden=[9, 6]),
    ],
    ids=["cnn1d", "cnn1d-one-block", "mlp"],
)
def test_stacked_gradients_equal_each_members_model(model: ModelParams) -> None:
    # what training steps on: each member's loss on its own batch, differentiated through the
    # stacked weights (the first layer's product of windows, the channels-last convolutions)
    arch = architecture(model, (2, 23))
    models = [build_classifier(arch, 4, seed) for seed in range(3)]
    names = [name for name, _ in models[0].named_parameters()]
    weights = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
        .clone()
        .requires_grad_()
        for name in names
    }
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 11, 2, 23, generator=g), torch.randint(0, 4, (3, 11), generator=g)
    logits = stacked_logits(copy.deepcopy(models[0]).to("meta"), weights, x)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    stacked = torch.autograd.grad(losses.sum(), [weights[name] for name in names])

    for i, model in enumerate(models):
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i], reduction="sum")
        alone = torch.autograd.grad(loss, list(model.parameters()))
        for name, got, expected in zip(names, stacked, alone, strict=True):
            torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_other_backbones_are_not_stackable() -> None:
    text = ModelParams(backbone="transformer", width=8, layers=1, heads=2, ff_width=16)
    arch = architecture(text, (12,), {"vocab_size": 50, "pad_id": 0})
    assert not stackable(build_classifier(arch, 3, 0))
