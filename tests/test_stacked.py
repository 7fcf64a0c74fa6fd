"""The written-out stacked forward pass gives each member what its own model gives."""

from __future__ import annotations

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


def test_other_backbones_are_not_stackable() -> None:
    text = ModelParams(backbone="transformer", width=8, layers=1, heads=2, ff_width=16)
    arch = architecture(text, (12,), {"vocab_size": 50, "pad_id": 0})
    assert not stackable(build_classifier(arch, 3, 0))
