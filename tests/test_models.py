"""Backbones, seeded init, and self-describing checkpoints that never execute code on load."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
import torch

from tasks.config.params import ModelParams
from tasks.data.datasets import DataError
from tasks.models.classifier import (
    CheckpointError,
    build_classifier,
    classifier_from_checkpoint,
    load_checkpoint,
    pretrained_classifier,
    save_checkpoint,
)
from tasks.models.shapes import architecture, check_targets_fit, input_mismatch

ARCH = architecture(ModelParams(channels=[4, 8], kernel_size=5), (1, 40))


@pytest.mark.parametrize("backbone", ["cnn1d", "mlp"])
def test_backbones_map_inputs_to_feature_dim(backbone: str) -> None:
    arch = architecture(ModelParams(backbone=backbone, hidden=[16]), (2, 40))
    model = build_classifier(arch, num_classes=3, seed=0)
    x = torch.randn(5, 2, 40)
    assert model.features(x).shape == (5, model.backbone.feature_dim)
    assert model(x).shape == (5, 3)


def test_same_seed_same_weights_even_from_parallel_threads() -> None:
    expected = {s: build_classifier(ARCH, 3, seed=s).state_dict() for s in range(4)}
    built: dict[int, dict] = {}
    start, stop = threading.Barrier(5), threading.Event()

    def build(seed: int) -> None:
        start.wait()
        built[seed] = build_classifier(ARCH, 3, seed=seed).state_dict()

    def draw_from_the_global_rng() -> None:  # what any other code in another thread may do
        start.wait()
        while not stop.is_set():
            torch.rand(100)

    noise = threading.Thread(target=draw_from_the_global_rng)
    threads = [threading.Thread(target=build, args=(s,)) for s in range(4)]
    for thread in [noise, *threads]:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    noise.join()
    for seed in range(4):
        for key, value in expected[seed].items():
            assert torch.equal(value, built[seed][key])
    assert not torch.equal(expected[0]["head.weight"], expected[1]["head.weight"])


def test_checkpoint_rebuilds_the_backbone_from_the_file_alone(tmp_path: Path) -> None:
    model = build_classifier(ARCH, num_classes=5, seed=1)
    path = tmp_path / "backbone.pt"
    save_checkpoint(path, model, metrics={"val_acc": 0.5})
    payload = load_checkpoint(path)
    assert payload["arch"] == ARCH and payload["metrics"] == {"val_acc": 0.5}
    fresh = classifier_from_checkpoint(path, num_classes=3, seed=7)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[key], value)
    assert fresh.head.out_features == 3  # a new head for the target


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save(
        {"format": 1, "arch": ARCH, "num_classes": 2, "state_dict": {}, "x": _Exploit()}, path
    )
    with pytest.raises(CheckpointError, match=r"refused to load"):
        load_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):  # and torch itself refused, not our check
        torch.load(path, weights_only=True)


def test_truncated_and_foreign_checkpoints_are_named(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    save_checkpoint(path, build_classifier(ARCH, 2, seed=0))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this pipeline"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_declared_arch(tmp_path: Path) -> None:
    path = tmp_path / "backbone.pt"
    model = build_classifier(ARCH, 2, seed=0)
    model.arch = {**ARCH, "channels": [4, 16]}  # declares other widths than it holds
    save_checkpoint(path, model)
    with pytest.raises(CheckpointError, match=r"weights do not fit the architecture"):
        classifier_from_checkpoint(path, 2, seed=0)


def test_a_cnn1d_backbone_takes_any_length() -> None:
    model = build_classifier(ARCH, 3, seed=0)  # built for L = 40
    for length in (7, 40, 427):
        assert model.features(torch.randn(2, 1, length)).shape == (2, 8)


@pytest.mark.parametrize(
    ("backbone", "shape"), [("cnn1d", (6, 100)), ("mlp", (1, 24)), ("mlp", (3, 40))]
)
def test_a_shape_the_input_layer_cannot_take_gets_a_fresh_one_and_keeps_the_rest(
    tmp_path: Path, backbone: str, shape: tuple[int, int]
) -> None:
    arch = architecture(ModelParams(backbone=backbone, channels=[4, 8], hidden=[16, 8]), (1, 40))
    pretrained = build_classifier(arch, 5, seed=3)
    save_checkpoint(tmp_path / "b.pt", pretrained)
    payload = load_checkpoint(tmp_path / "b.pt")
    assert input_mismatch(arch, shape) is not None and input_mismatch(arch, (1, 40)) is None
    models = [pretrained_classifier(payload, 2, seed, tmp_path / "b.pt", shape) for seed in (0, 1)]
    for model in models:
        assert model.fresh == {"backbone.blocks.0.0.weight", "backbone.blocks.0.0.bias"}
        assert model(torch.randn(2, *shape)).shape == (2, 2)
        weights = dict(model.backbone.named_parameters())
        for name, value in pretrained.backbone.named_parameters():  # every layer above: kept
            if not name.startswith("blocks.0."):
                assert torch.equal(weights[name], value)
    # one fresh input layer for every seed (the one `extract` gave the probe its features from)
    first, second = (dict(m.backbone.named_parameters()) for m in models)
    assert torch.equal(first["blocks.0.0.weight"], second["blocks.0.0.weight"])
    assert not torch.equal(models[0].head.weight, models[1].head.weight)
    same_shape = pretrained_classifier(payload, 2, 0, tmp_path / "b.pt", (1, 40))
    assert same_shape.fresh == frozenset()


def test_before_pretraining_a_target_that_would_keep_nothing_pretrained_is_refused() -> None:
    shapes = {"src": (1, 40), "wide": (6, 40), "longer": (1, 427), "six": (6, 100)}
    targets = ["longer", "six"]
    notes = check_targets_fit(ModelParams(backbone="cnn1d"), shapes, "src", targets)
    assert notes == ["targets.six: a fresh input layer for in_channels 6 (pretrained on 1)"]
    # each source's backbone is checked against the targets: another source, another answer
    assert check_targets_fit(ModelParams(backbone="cnn1d"), shapes, "wide", targets) == [
        "targets.longer: a fresh input layer for in_channels 1 (pretrained on 6)"
    ]
    notes = check_targets_fit(ModelParams(backbone="mlp", hidden=[16, 16]), shapes, "src", targets)
    assert [note.split(":")[0] for note in notes] == ["targets.longer", "targets.six"]
    with pytest.raises(DataError, match=r"targets.longer: the mlp backbone's only layer .* 427"):
        check_targets_fit(ModelParams(backbone="mlp", hidden=[16]), shapes, "src", targets)
