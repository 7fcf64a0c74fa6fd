"""Texts through the same five stages: the tiny text study through Prefect and `dvc repro`, MLM
pretraining, layer-wise learning-rate decay, and a bad table refused as a user meets it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from tasks.config.params import FinetuneParams, ModelParams, load_params
from tasks.finetune import rate_scales
from tasks.models.classifier import build_classifier, load_checkpoint
from tasks.models.shapes import architecture
from tests.helpers import (
    REPO,
    make_workspace,
    one_line_error,
    results_digest,
    run_command,
)

pytestmark = pytest.mark.slow
TEXT_TINY = REPO / "tests" / "params.text.tiny.yaml"
PARENT = "mlflow.parentRunId"


def _run(workspace: Path, command: list[str], prefect_home: Path) -> None:
    result = run_command(
        ["python", *command],
        cwd=workspace,
        env={
            "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
            "PREFECT_HOME": str(prefect_home),
        },
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (workspace / "run.log").write_text(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny text study, once through the Prefect flow and once through `dvc repro`."""
    root = tmp_path_factory.mktemp("text")
    done = {}
    for name, command in [
        ("prefect", ["-m", "flows.pipeline", "--params", "params.yaml"]),
        ("dvc", ["-m", "dvc", "repro"]),
    ]:
        done[name] = make_workspace(root / name, TEXT_TINY)
        _run(done[name], command, root / "prefect-home")
    return done


def test_both_orchestrators_give_identical_text_results(text_runs) -> None:
    prefect, dvc = results_digest(text_runs["prefect"]), results_digest(text_runs["dvc"])
    assert {"data/results/near.csv", "data/results/ciphered.csv"} <= prefect.keys()
    assert prefect == dvc
    table = pd.read_csv(text_runs["dvc"] / "reports" / "comparison.csv")
    assert set(table["strategy"]) == {"scratch", "linear_probe", "finetune", "lp_ft", "partial"}
    assert table["test_acc_mean"].between(0, 1).all()


def test_text_records_nest_like_the_time_series_study(text_runs) -> None:
    workspace = text_runs["prefect"]
    params = load_params(workspace / "params.yaml")
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    levels = {r.info.run_id: r.data.tags.get("level") for r in runs}
    parent_level = {r.data.tags["level"]: levels.get(r.data.tags.get(PARENT)) for r in runs}
    assert parent_level == {
        "execution": None,
        "stage": "execution",
        "budget": "stage",
        "seed": "budget",
    }


def test_checkpoint_carries_its_tokenizer(text_runs) -> None:
    """The registered backbone is all one needs: the ids it reads come from the tokenizer in it."""
    from tokenizers import Tokenizer

    payload = load_checkpoint(text_runs["dvc"] / "data" / "checkpoints" / "source" / "backbone.pt")
    assert payload["arch"]["name"] == "transformer"
    tokenizer = Tokenizer.from_str(payload["tokenizer"])
    assert tokenizer.get_vocab_size() == payload["arch"]["vocab_size"]
    saved = (text_runs["dvc"] / "data" / "prepared" / "source" / "tokenizer.json").read_text()
    assert payload["tokenizer"] == saved


def test_mlm_beats_the_unigram_guess(tmp_path: Path) -> None:
    """A short masked-language pretraining on the tiny corpus predicts masked tokens far better
    than always guessing the commonest token: it learnt from context."""
    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout

    overrides = [
        *("pretrain.objective=mlm", "pretrain.max_epochs=30", "pretrain.patience=30"),
        *("sources.source.max_per_class=120", "model.width=32", "model.ff_width=64"),
    ]
    params = load_params(TEXT_TINY, overrides)
    layout = Layout(tmp_path / "ws")
    prepare(params, layout, Recorder())
    summary = pretrain(params, "source", layout, Recorder())
    assert summary["val_acc"] > 1.5 * summary["val_unigram_acc"] > 0, summary


def test_layer_decay_multiplies_the_rate_per_block_down_from_the_head() -> None:
    model_params = ModelParams(backbone="transformer", width=8, layers=3, heads=2, ff_width=16)
    arch = architecture(model_params, (12,), {"vocab_size": 50, "pad_id": 0})
    model = build_classifier(arch, num_classes=3, seed=0)
    cfg = FinetuneParams(backbone_lr_scale=0.5, layer_decay=0.8)
    scales = rate_scales(model, cfg, transfer=True)
    assert scales["head.weight"] == scales["head.bias"] == 1.0
    for name, scale in scales.items():
        if name.startswith("backbone.blocks."):
            depth = 3 - int(name.split(".")[2])  # the top block (2) is one below the head
            assert scale == pytest.approx(0.5 * 0.8**depth), name
        elif name.startswith("backbone.embed."):
            assert scale == pytest.approx(0.5 * 0.8**4), name
    assert any(n.startswith("backbone.embed.") for n in scales)
    assert set(rate_scales(model, cfg, transfer=False).values()) == {1.0}  # scratch


def test_partial_freezes_the_embeddings_and_the_lowest_layers() -> None:
    from tasks.models.classifier import freeze_lower

    model_params = ModelParams(backbone="transformer", width=8, layers=3, heads=2, ff_width=16)
    arch = architecture(model_params, (12,), {"vocab_size": 50, "pad_id": 0})
    model = build_classifier(arch, num_classes=3, seed=0)
    freeze_lower(model, 2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(
        n.startswith(("backbone.embed.", "backbone.blocks.0.", "backbone.blocks.1."))
        for n in frozen
    )
    assert any(n.startswith("backbone.embed.") for n in frozen)
    assert all(
        p.requires_grad
        for n, p in model.named_parameters()
        if n.startswith(("backbone.blocks.2.", "head."))
    )


def test_a_table_without_its_text_column_is_refused_in_one_line(tmp_path: Path) -> None:
    """As a user meets it: through `python -m flows.pipeline`, before any work, one line naming
    the file and the key, and a non-zero exit."""
    workspace = make_workspace(tmp_path / "ws", TEXT_TINY)
    table = workspace / "data" / "raw" / "reviews.csv"
    pd.DataFrame({"review": ["good film", "bad film"] * 10, "label": [1, 0] * 10}).to_csv(
        table, index=False
    )
    result = run_command(
        [
            *("python", "-m", "flows.pipeline", "--params", "params.yaml"),
            *("--set", "targets.near={kind: text, path: data/raw/reviews.csv}"),
        ],
        cwd=workspace,
        env={
            "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
        },
    )
    assert result.returncode != 0
    line = one_line_error(result)
    assert "reviews.csv" in line and "text" in line and "targets.near.text_column" in line
    assert "Traceback" not in result.stderr
    assert not (workspace / "data" / "prepared").exists()  # refused before any work


def test_scratch_and_transfer_share_the_architecture(text_runs) -> None:
    """scratch is the same network, randomly initialised: same parameter names and shapes."""
    payload = load_checkpoint(text_runs["dvc"] / "data" / "checkpoints" / "source" / "backbone.pt")
    scratch = build_classifier(payload["arch"], num_classes=3, seed=0)
    shapes = {k: v.shape for k, v in payload["state_dict"].items() if k.startswith("backbone.")}
    assert shapes == {
        k: v.shape for k, v in scratch.state_dict().items() if k.startswith("backbone.")
    }
    assert not all(
        torch.equal(payload["state_dict"][k], v)
        for k, v in scratch.state_dict().items()
        if k.startswith("backbone.")
    )


def test_partial_from_frozen_states_is_the_same_network() -> None:
    """`partial` trains the blocks above the frozen ones from their output computed once: the
    same logits as the whole network run from the token ids."""
    from tasks.models.classifier import freeze_lower
    from tasks.models.frozen import UpperBlocks, frozen_states

    model_params = ModelParams(backbone="transformer", width=16, layers=3, heads=2, ff_width=32)
    arch = architecture(model_params, (10,), {"vocab_size": 60, "pad_id": 0})
    model = build_classifier(arch, num_classes=4, seed=3).eval()
    ids = torch.randint(5, 60, (7, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 6:] = 0  # padding at the end
    ids[0, 3:] = 0
    freeze_lower(model, 2)
    whole = model(ids)
    packed = torch.from_numpy(frozen_states(model.backbone, ids.numpy(), 2, torch.device("cpu")))
    assert packed.shape == (7, 10, 17)
    model.backbone = UpperBlocks(model.backbone, 2)
    torch.testing.assert_close(model(packed), whole, rtol=1e-5, atol=1e-6)


def test_masked_tokens_follow_the_bert_recipe() -> None:
    """15% of the ordinary tokens chosen (at least one per text), of those 80% [MASK], 10% a
    random ordinary token, 10% kept; [PAD], [CLS], [SEP] never chosen; the same key, the same
    draw."""
    from tasks.learning.mlm import MaskedTokens

    vocab, pad, cls, sep, mask = 500, 0, 2, 3, 4
    objective = MaskedTokens(0.15, mask, vocab, (0, 1, 2, 3, 4), (pad, cls, sep, mask), seed=0)
    ids = torch.randint(5, vocab, (400, 40), generator=torch.Generator().manual_seed(1))
    ids[::10, 5] = unk = 1  # an unknown word now and then: it can be chosen
    ids[0, 1:30] = unk  # a text of unknown words only still has tokens to predict
    ids[:, 0], ids[:, 30], ids[:, 31:] = cls, sep, pad  # [CLS] 29 tokens [SEP] padding
    (masked, chosen), targets = objective.inputs(ids, torch.zeros(400), (0, 3, 0))
    ordinary = ((ids >= 5) | (ids == unk)).sum().item()
    assert not chosen[:, 0].any() and not chosen[:, 30:].any()
    assert chosen[0].any() and chosen[ids == unk].any()
    assert chosen.sum().item() / ordinary == pytest.approx(0.15, abs=0.01)
    assert chosen.any(1).all()
    assert torch.equal(targets, ids[chosen])
    became = masked[chosen]
    share = {
        "mask": (became == mask).double().mean().item(),
        "kept": (became == targets).double().mean().item(),
    }
    assert share["mask"] == pytest.approx(0.8, abs=0.02)
    assert share["kept"] == pytest.approx(0.1 + 0.1 / (vocab - 5), abs=0.02)
    replaced = became[(became != mask) & (became != targets)]
    assert len(replaced) and (replaced >= 5).all()  # random replacements are ordinary tokens
    assert torch.equal(masked[~chosen], ids[~chosen])
    again = objective.inputs(ids, torch.zeros(400), (0, 3, 0))
    other = objective.inputs(ids, torch.zeros(400), (0, 3, 32))
    assert torch.equal(again[0][1], chosen) and not torch.equal(other[0][1], chosen)


def test_tokenizer_learns_from_the_source_training_texts_only(tmp_path: Path) -> None:
    """A word that fills a target's texts is no token of the vocabulary; trained on those
    texts, it would be one (so the check can fail)."""
    from tasks.data.tokens import train_tokenizer
    from tasks.prepare import prepare
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout

    table = tmp_path / "zebra.csv"
    texts = [f"zebracorn zebracorn number {i % 7}" for i in range(60)]
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(60)]}).to_csv(table, index=False)
    params = load_params(TEXT_TINY, [f"targets.near={{kind: text, path: {table}}}"])
    layout = Layout(tmp_path / "ws")
    prepare(params, layout, Recorder())
    vocab = json.loads((layout.prepared("source") / "tokenizer.json").read_text())["model"][
        "vocab"
    ]
    assert "zebracorn" not in vocab
    leaky = train_tokenizer(np.array(texts), params.text)
    assert leaky.token_to_id("zebracorn") is not None


def test_a_fortunes_folder_of_ones_own_is_read_and_recorded(tmp_path: Path) -> None:
    """kind fortunes with `path` (a folder): prepare reads the class files there, records each
    file's md5 (in MLflow, and in meta.json, so that new files change the outputs)."""
    workspace = make_workspace(tmp_path / "ws", TEXT_TINY)
    folder = workspace / "data" / "raw" / "quotes"
    folder.mkdir()
    for name in ("law", "food", "sports"):
        entries = [f"{name} saying number {i} about {name}" for i in range(30)]
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n")
    result = run_command(
        ["python", "-m", "tasks.prepare", "--set", "targets.near.path=data/raw/quotes"],
        cwd=workspace,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((workspace / "data" / "prepared" / "near" / "meta.json").read_text())
    assert set(meta["files_md5"]) == {f"data/raw/quotes/{n}" for n in ("law", "food", "sports")}
    assert meta["sizes"]["train"] + meta["sizes"]["val"] + meta["sizes"]["test"] == 75
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    (run,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.info.run_name == "prepare"
    ]
    assert "dvc.md5.data/raw/quotes/law" in run.data.tags


def test_an_unlabelled_table_is_a_source_for_mlm(tmp_path: Path) -> None:
    """A table without labels pretrains by masked-language modelling (and only so)."""
    from tasks.config.params import ParamsError
    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout

    corpus = tmp_path / "corpus.jsonl"
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away"]
    rows = [{"text": " ".join(words[i % 7 : i % 7 + 6])} for i in range(80)]
    pd.DataFrame(rows).to_json(corpus, orient="records", lines=True)
    source = f"sources.source={{kind: text, path: {corpus}, label_column: null}}"
    with pytest.raises(ParamsError, match=r"sources\.source has no label_column: .* mlm"):
        load_params(TEXT_TINY, [source])
    params = load_params(TEXT_TINY, [source, "pretrain.objective=mlm"])
    layout = Layout(tmp_path / "ws")
    prepare(params, layout, Recorder())
    summary = pretrain(params, "source", layout, Recorder())
    assert 0 < summary["val_unigram_acc"] < 1 and 0 <= summary["val_acc"] <= 1
    assert load_checkpoint(layout.checkpoint("source"))["arch"]["name"] == "transformer"
