"""Pretraining on 2 CPU processes (torchrun, DDP over gloo) trains as one process does with the
same global batch, through the real switch: the stage command with pretrain.processes=2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from tasks.config.params import load_params
from tasks.learning.train import Shard
from tasks.models.classifier import classifier_from_checkpoint, load_checkpoint
from tasks.prepare import prepare
from tasks.pretrain import pretrain
from tasks.recording.recorder import MemoryRecorder
from tasks.recording.tracking import PARENT_TAG
from tasks.workspace.layout import Layout
from tests.helpers import make_workspace, run_command

EPOCHS = 8
# An odd global batch: the two ranks' shares differ by one example at every step (25 + 24),
# and the last batch of the 360 training examples is odd too (17), the cases where the ranks'
# losses must be weighted by the global batch, not averaged per rank. All epochs run
# (patience = epochs), so both runs keep the same epoch's weights. One intra-op thread: the
# two ranks then do not compete for the 2 cores (and single-process runs use the same count).
OVERRIDES = [
    "sources.views.objective=supervised",  # contrastive pretraining runs in one process
    f"pretrain.max_epochs={EPOCHS}",
    f"pretrain.patience={EPOCHS}",
    "pretrain.batch_size=49",
    "runtime.threads=1",
]
# Measured here: per-epoch train losses within 1.7e-7 of one process's, weights within 1.2e-7.
# Not bit-equal: each rank sums its share of a batch and gloo adds the two sums, a float32
# summation order that differs from one process's, and Adam carries the rounding along. The
# tolerances leave some 60x for other CPUs' kernels and stay far below what wrong sharding
# does (measured by breaking tasks/learning/train.py on purpose): per-rank mean losses instead of the
# global-batch weighting move the losses by 7e-4 and the weights by 1e-2; both ranks
# training on the same half of each batch, by 0.17 and 0.09.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


@pytest.mark.slow  # 3 more Python processes start (torchrun, 2 ranks): 17 s, 47 s on busy cores
def test_two_processes_pretrain_as_one_with_the_same_global_batch(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "ws")
    layout = Layout(workspace)
    params = load_params(workspace / "params.yaml", OVERRIDES)
    prepare(params, layout, MemoryRecorder())
    single = MemoryRecorder()
    pretrain(params, "digits", layout, single)  # processes: 1, in this process
    single_losses = [v for _, key, v in single.children[0].history if key == "train/loss"]
    single_weights = load_checkpoint(layout.checkpoint("digits"))["state_dict"]
    assert len(single_losses) == EPOCHS

    store = f"sqlite:///{workspace / 'mlflow.db'}"
    sets = [arg for override in OVERRIDES for arg in ("--set", override)]
    result = run_command(
        [
            "python",
            "-m",
            "tasks.pretrain",
            "--source",
            "digits",
            *sets,
            "--set",
            "pretrain.processes=2",
        ],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": store},
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # one pretrain run, recorded by rank 0 under the command's parent run
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(params.experiment).experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    (stage,) = [r for r in runs if r is not parent]
    assert stage.info.run_name == "pretrain digits"
    assert stage.data.tags[PARENT_TAG] == parent.info.run_id
    assert {parent.info.status, stage.info.status} == {"FINISHED"}
    assert stage.data.params["processes"] == "2"
    history = sorted(
        client.get_metric_history(stage.info.run_id, "train/loss"), key=lambda m: m.step
    )
    ddp_loss = [m.value for m in history]

    assert len(ddp_loss) == EPOCHS
    difference = max(abs(a - b) for a, b in zip(ddp_loss, single_losses, strict=True))
    assert difference <= LOSS_TOLERANCE, (difference, ddp_loss, single_losses)
    print(f"DDP vs one process: max |train loss difference| per epoch {difference:.2e}")

    # the checkpoint rank 0 wrote loads as any other, with weights close to one process's
    checkpoint = load_checkpoint(layout.checkpoint("digits"))
    assert checkpoint["params"]["pretrain"]["processes"] == 2
    for name, weight in checkpoint["state_dict"].items():
        torch.testing.assert_close(weight, single_weights[name], rtol=0, atol=WEIGHT_TOLERANCE)
    model = classifier_from_checkpoint(layout.checkpoint("digits"), num_classes=3, seed=0)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 3)
    summary = json.loads(layout.checkpoint_meta("digits").read_text())
    assert summary["epochs_run"] == EPOCHS
    assert not layout.pretrain_state("digits").exists()


@pytest.mark.parametrize(("world", "batch_size"), [(2, 64), (2, 49), (3, 17), (4, 3)])
def test_rank_shares_partition_the_batch_and_their_gradients_average_to_the_whole(
    world: int, batch_size: int
) -> None:
    """What DDP does with the ranks' losses (average their gradients), in one process."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randperm(100, generator=generator)[:batch_size]
    logits = torch.randn(100, 5, generator=generator, requires_grad=True)
    y = torch.randint(0, 5, (100,), generator=generator)

    shares = [Shard(rank, world).take(batch) for rank in range(world)]
    assert sorted(torch.cat(shares).tolist()) == sorted(batch.tolist())  # each example once

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(loss, logits)
        return grad

    whole = gradient(F.cross_entropy(logits[batch], y[batch]))
    per_rank = [
        gradient(Shard(rank, world).loss(logits[share], y[share], batch_size))
        for rank, share in enumerate(shares)
    ]
    averaged = torch.stack(per_rank).mean(0)  # DDP: the sum over ranks (all-reduce) / world
    torch.testing.assert_close(averaged, whole, rtol=1e-5, atol=1e-7)
