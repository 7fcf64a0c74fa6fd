"""Images through the same five stages: the tiny image study (Debian's Fashion-MNIST) through
Prefect and `dvc repro`, timm's stages as blocks, augmentation drawn per image and per run,
off-the-shelf weights from a local file, and a bad image refused as a user meets it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from tasks.config.params import ModelParams, ParamsError, load_params
from tasks.learning.augment import Augmented, build_augmentation
from tasks.learning.train import EVAL_KEY, SUPERVISED, TRAIN_KEY
from tasks.models.classifier import build_classifier, freeze_lower, load_checkpoint
from tasks.models.errors import CheckpointError
from tasks.models.shapes import architecture
from tasks.models.vision import load_off_the_shelf
from tests.helpers import (
    REPO,
    make_workspace,
    one_line_error,
    results_digest,
    run_command,
    run_state_env,
)

IMAGES_TINY = REPO / "tests" / "params.images.tiny.yaml"
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
SMALL = ModelParams(
    backbone="timm",
    architecture="resnet18",
    architecture_args={"channels": [4, 8, 8, 8], "layers": [1, 1, 1, 1]},
)


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny image study, once through the Prefect flow and once through `dvc repro`."""
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("images")
    done = {}
    for name, command in [
        ("prefect", ["-m", "flows.pipeline", "--params", "params.yaml"]),
        ("dvc", ["-m", "dvc", "repro"]),
    ]:
        done[name] = make_workspace(root / name, IMAGES_TINY)
        result = run_command(
            ["python", *command],
            cwd=done[name],
            env=run_state_env(done[name], root / "prefect-home"),
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return done


@pytest.mark.slow
def test_both_orchestrators_give_identical_image_results(image_runs) -> None:
    prefect, dvc = results_digest(image_runs["prefect"]), results_digest(image_runs["dvc"])
    assert {"data/results/near.csv", "data/results/scrambled.csv"} <= prefect.keys()
    assert prefect == dvc
    table = pd.read_csv(image_runs["dvc"] / "reports" / "comparison.csv")
    assert set(table["strategy"]) == {"scratch", "linear_probe", "finetune", "lp_ft", "partial"}
    assert table["test_acc_mean"].between(0, 1).all()
    report = (image_runs["dvc"] / "reports" / "report.md").read_text()
    assert "(C, H, W) 1x16x16" in report and "pixels scrambled (seed 7)" in report
    assert "RandomCrop" in report  # the method names the augmentation


@pytest.mark.slow
def test_image_records_nest_and_the_backbone_is_timms(image_runs) -> None:
    workspace = image_runs["prefect"]
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert {r.data.tags.get("level") for r in runs} == {"execution", "stage", "budget", "seed"}
    payload = load_checkpoint(workspace / "data" / "checkpoints" / "source" / "backbone.pt")
    assert payload["arch"] == {
        "name": "timm",
        "in_chans": 1,
        "architecture": "resnet18",
        "args": params.model.architecture_args,
    }
    # the prepared images are the cache every later stage reads: (N, 1, 16, 16) in [0, 1]
    train = np.load(workspace / "data" / "prepared" / "near" / "train.npz")["x"]
    assert train.shape[1:] == (1, 16, 16) and 0 <= train.min() < train.max() <= 1


def test_timm_stages_are_the_blocks_partial_freezes() -> None:
    """Blocks are timm's feature stages, the stem first; a frozen stage's batch norms keep
    their statistics in training mode."""
    model = build_classifier(architecture(SMALL, (1, 16, 16)), num_classes=3, seed=0)
    stages = model.backbone.blocks
    assert len(stages) == 5  # stem, layer1..layer4
    net = model.backbone.net
    assert {id(m) for m in stages[0]} == {id(net.conv1), id(net.bn1)}
    every = {id(p) for stage in stages for p in stage.parameters()}
    assert every == {id(p) for p in model.backbone.parameters()}  # each parameter in one stage
    freeze_lower(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(
        n.startswith(("backbone.net.conv1", "backbone.net.bn1", "backbone.net.layer1"))
        for n in frozen
    )
    model.train()
    assert not net.bn1.training and not net.layer1[0].bn1.training
    assert net.layer2[0].bn1.training and model.head.training
    before = net.layer1[0].bn1.running_mean.clone()
    model(torch.rand(8, 1, 16, 16))
    assert torch.equal(net.layer1[0].bn1.running_mean, before)
    assert not torch.equal(net.layer2[0].bn1.running_mean, torch.zeros(8))


def test_the_same_seed_builds_the_same_resnet_in_any_thread() -> None:
    arch = architecture(SMALL, (1, 16, 16))
    built: list[dict[str, torch.Tensor]] = []
    thread = threading.Thread(
        target=lambda: built.append(build_classifier(arch, 3, 5).state_dict())
    )
    thread.start()
    thread.join()
    here = build_classifier(arch, 3, 5).state_dict()
    assert all(torch.equal(here[k], built[0][k]) for k in here)
    other = build_classifier(arch, 3, 6).state_dict()
    assert not torch.equal(here["backbone.net.conv1.weight"], other["backbone.net.conv1.weight"])


def test_augmentation_draws_per_image_per_batch_and_never_at_evaluation() -> None:
    transform = build_augmentation(
        [{"RandomCrop": {"size": 16, "padding": 4}}], "finetune.augment", (1, 16, 16)
    )
    objective = Augmented(SUPERVISED, transform, seed=3)
    x = torch.rand(1, 1, 16, 16).repeat(32, 1, 1, 1)  # the same image 32 times
    y = torch.zeros(32, dtype=torch.int64)
    (augmented,), labels = objective.inputs(x, y, (TRAIN_KEY, 0, 0))
    assert augmented.shape == x.shape and torch.equal(labels, y)
    assert len({tuple(image.flatten().tolist()) for image in augmented}) > 16  # own draws
    (again,), _ = objective.inputs(x, y, (TRAIN_KEY, 0, 0))
    (later,), _ = objective.inputs(x, y, (TRAIN_KEY, 1, 0))
    (other_run,), _ = Augmented(SUPERVISED, transform, seed=4).inputs(x, y, (TRAIN_KEY, 0, 0))
    assert torch.equal(again, augmented)
    assert not torch.equal(later, augmented) and not torch.equal(other_run, augmented)
    (evaluated,), _ = objective.inputs(x, y, (EVAL_KEY, 0))
    assert torch.equal(evaluated, x)
    # the process-wide generator is left as it was: draws elsewhere do not depend on ours
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    objective.inputs(x, y, (TRAIN_KEY, 0, 0))
    assert torch.equal(torch.rand(3), expected)


def test_augmentation_is_the_same_under_concurrent_threads() -> None:
    transform = build_augmentation(
        [{"RandomAffine": {"degrees": 20, "translate": [0.1, 0.1]}}], "augment", (1, 16, 16)
    )
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.int64)

    def draws(seed: int) -> list[torch.Tensor]:
        objective = Augmented(SUPERVISED, transform, seed)
        return [objective.inputs(x, y, (TRAIN_KEY, 0, start))[0][0] for start in range(20)]

    alone = {seed: draws(seed) for seed in (0, 1)}
    together: dict[int, list[torch.Tensor]] = {}
    threads = [
        threading.Thread(target=lambda s=seed: together.__setitem__(s, draws(s)))
        for seed in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(alone[seed], together[seed], strict=True))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            "finetune.augment=[{RandomCrap: {size: 16}}]",
            "finetune.augment.0: 'RandomCrap' is not a torchvision.transforms.v2",
        ),
        ("finetune.augment=[{RandomCrop: {sise: 16}}]", "finetune.augment.0: RandomCrop"),
        (
            "pretrain.augment=[{RandomCrop: {size: 16}}, {ColorJitter: {brightness: -1}}]",
            "pretrain.augment.1: ColorJitter",
        ),
        (
            "finetune.freeze_blocks=5",
            "finetune.freeze_blocks (5) must be below the number of backbone blocks (5)",
        ),
        ("finetune.augment=[{RandomCrop: {size: 28}}]", "finetune.augment.0: RandomCrop"),
        (
            "finetune.augment=[{RandomResizedCrop: {size: 12}}]",
            "turns a (1, 16, 16) float image into (1, 12, 12)",
        ),
        (
            "model={backbone: timm, architecture: convnext_atto, pretrained_path: null}",
            "model: no seeded init for its ConvNeXtBlock layers",
        ),
    ],
)
def test_a_bad_image_model_is_refused_before_any_work(override: str, named: str) -> None:
    """The pre-flight check of `python -m flows.pipeline` (and each stage, when it starts):
    one line each (the frame prints ParamsError and CheckpointError alike)."""
    from tasks.frame import check_image_model

    with pytest.raises((ParamsError, CheckpointError)) as caught:
        params = load_params(IMAGES_TINY, [override])
        check_image_model(params, (params.image.channels, *params.image.size))
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_a_transform_in_params_must_be_named_alone() -> None:
    with pytest.raises(ParamsError, match=r"finetune\.augment: .*entry 0: name one transform"):
        load_params(
            IMAGES_TINY, ["finetune.augment=[{RandomCrop: {size: 16}, RandomHorizontalFlip: {}}]"]
        )


@pytest.mark.parametrize(
    ("params_file", "override", "named"),
    [
        (
            "params.tiny.yaml",
            "pretrain.augment=[{RandomCrop: {size: 8}}]",
            r"pretrain\.augment: only for images",
        ),
        (
            "params.tiny.yaml",
            "targets.x={kind: npz, path: params.tiny.yaml, scramble_seed: 3}",
            r"targets\.x\.scramble_seed: only for images",
        ),
        (
            "params.tiny.yaml",
            "targets.x={kind: npz, path: params.tiny.yaml, max_per_class: 5}",
            r"targets\.x\.max_per_class: only for images",
        ),
        (
            "params.images.tiny.yaml",
            "pretrain.processes=2",
            r"pretrain\.augment runs in one process",
        ),
        (
            "params.images.tiny.yaml",
            "model.architecture_args={drop_path_rate: 0.1}",
            r"drop_path_rate draw at random",
        ),
    ],
)
def test_settings_that_cannot_hold_are_refused_when_params_load(
    params_file: str, override: str, named: str
) -> None:
    with pytest.raises(ParamsError, match=named):
        load_params(REPO / "tests" / params_file, [override])


def test_building_networks_in_another_thread_leaves_augmentation_draws_alone() -> None:
    """The flow builds networks (a target's stage count, a scratch start) and augmentations
    while other groups train: neither may draw from under a seeded augmentation."""
    from tasks.models.vision import stage_count

    transform = build_augmentation([{"RandomAffine": {"degrees": 30}}], "augment", (1, 16, 16))
    objective = Augmented(SUPERVISED, transform, seed=0)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.int64)
    alone = [objective.inputs(x, y, (TRAIN_KEY, 0, i))[0][0] for i in range(30)]
    stop = threading.Event()

    def build() -> None:  # what a group or stage does as it starts
        while not stop.is_set():
            stage_count("resnet18", SMALL.architecture_args)
            build_classifier(architecture(SMALL, (1, 16, 16)), 3, 0)
            build_augmentation([{"RandomCrop": {"size": 16}}], "augment", (1, 16, 16))

    builder = threading.Thread(target=build)
    builder.start()
    try:
        beside = [objective.inputs(x, y, (TRAIN_KEY, 0, i))[0][0] for i in range(30)]
    finally:
        stop.set()
        builder.join()
    assert all(torch.equal(a, b) for a, b in zip(alone, beside, strict=True))


def _resnet_weights(channels: int, seed: int) -> dict[str, torch.Tensor]:
    """A ResNet's weights as timm or torchvision would ship them: with the classifier `fc`."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(
        "resnet18", in_chans=channels, num_classes=7, **SMALL.architecture_args
    )
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_off_the_shelf_weights_load_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    """The classifier's weights are dropped, a colour first convolution is summed over RGB for
    grey inputs (timm's rule), every other weight is the file's."""
    from safetensors.torch import save_file

    weights = _resnet_weights(3, seed=1)
    path = tmp_path / f"resnet{suffix}"
    if suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save({"state_dict": weights}, path)  # a training checkpoint nests them
    model = build_classifier(architecture(SMALL, (1, 16, 16)), num_classes=3, seed=0)
    load_off_the_shelf(model.backbone, path)
    loaded = model.backbone.net.state_dict()
    assert "fc.weight" not in loaded
    torch.testing.assert_close(
        loaded["conv1.weight"], weights["conv1.weight"].sum(1, keepdim=True)
    )
    for key in ("layer3.0.conv2.weight", "bn1.running_var", "layer4.0.bn2.bias"):
        assert torch.equal(loaded[key], weights[key]), key


def test_weights_of_another_architecture_are_refused_in_one_line(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)  # 64..512 wide
    model = build_classifier(architecture(SMALL, (1, 16, 16)), num_classes=3, seed=0)
    with pytest.raises(CheckpointError, match=r"other\.pth: these weights are not a resnet18"):
        load_off_the_shelf(model.backbone, path)
    path.write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match=r"other\.pth: not a readable weights file"):
        load_off_the_shelf(model.backbone, path)


@needs_fashion
def test_off_the_shelf_weights_stand_in_for_pretraining(tmp_path: Path) -> None:
    """pretrain writes the file's weights as the checkpoint, with the path and hash recorded by
    prepare; weights changed after prepare are refused in one line."""
    from safetensors.torch import save_file

    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout

    weights = _resnet_weights(1, seed=2)
    path = tmp_path / "resnet.safetensors"
    save_file(weights, str(path))
    params = load_params(IMAGES_TINY, [f"model.pretrained_path={path}"])
    layout = Layout(tmp_path / "ws")
    prepare(params, layout, Recorder())
    summary = pretrain(params, "source", layout, Recorder())
    assert summary == {"epochs_run": 0, "steps": 0}
    payload = load_checkpoint(layout.checkpoint("source"))
    assert torch.equal(
        payload["state_dict"]["backbone.net.layer2.0.conv1.weight"],
        weights["layer2.0.conv1.weight"],
    )
    assert payload["source_meta"]["pretrained"]["path"] == str(path)
    save_file(_resnet_weights(1, seed=3), str(path))  # new weights, prepare not rerun
    with pytest.raises(CheckpointError, match=r"resnet\.safetensors: changed since `prepare`"):
        pretrain(params, "source", layout, Recorder())


@needs_fashion
def test_a_corrupt_image_is_refused_in_one_line_through_the_flow(tmp_path: Path) -> None:
    """As a user meets it: `python -m flows.pipeline` with a folder holding a truncated PNG
    fails before any work with one line naming the file, and a non-zero exit."""
    from PIL import Image

    workspace = make_workspace(tmp_path / "ws", IMAGES_TINY)
    folder = workspace / "data" / "raw" / "shapes"
    for label in ("round", "square"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / label / f"{i}.png")
    broken = folder / "square" / "3.png"
    broken.write_bytes(broken.read_bytes()[:40])
    result = run_command(
        [
            *("python", "-m", "flows.pipeline", "--params", "params.yaml"),
            *("--set", "targets.near={kind: images, path: data/raw/shapes}"),
        ],
        cwd=workspace,
        env=run_state_env(workspace, tmp_path / "prefect-home"),
    )
    assert result.returncode != 0
    line = one_line_error(result)
    assert "3.png" in line, line
    assert "Traceback" not in result.stderr
    assert not (workspace / "data" / "prepared").exists()  # refused before any work
