"""Text encoders: our own TextEncoder, and the packaged all-MiniLM-L6-v2 read offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from tasks.models import pretrained
from tasks.models.errors import CheckpointError
from tasks.models.pretrained import (
    PretrainedEncoder,
    PretrainedFiles,
    install_minilm,
    read_pretrained_dir,
)
from tasks.models.transformer import MaskedLmHead, TextEncoder, seeded_init

GUITAR, PARAPHRASE, UNRELATED = (
    "A man is playing a guitar.",
    "Someone plays a guitar.",
    "The stock market fell sharply today.",
)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_minilm(tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> tuple[PretrainedFiles, PretrainedEncoder]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        files = read_pretrained_dir(minilm_dir)
        return files, PretrainedEncoder.from_files(files).eval()


def token_ids(files: PretrainedFiles, texts: list[str]) -> torch.Tensor:
    """(B, L) ids of `texts`, [CLS] ... [SEP], padded at the end to the longest with pad_id."""
    tokenizer = Tokenizer.from_str(files.tokenizer_json)
    tokenizer.no_padding()
    encoded = [tokenizer.encode(text).ids for text in texts]
    longest = max(map(len, encoded))
    return torch.tensor([ids + [files.pad_id] * (longest - len(ids)) for ids in encoded])


def test_minilm_embeds_paraphrases_closer_than_unrelated_texts(minilm) -> None:
    files, encoder = minilm
    ids = token_ids(files, [GUITAR, PARAPHRASE, UNRELATED])
    assert (ids == files.pad_id).any()  # the short texts are padded: pooling must skip it
    with torch.no_grad():
        guitar, paraphrase, unrelated = encoder(ids)
    close = F.cosine_similarity(guitar, paraphrase, dim=0)
    far = F.cosine_similarity(guitar, unrelated, dim=0)
    assert close > far + 0.3, (close, far)


def test_minilm_pooling_equals_transformers_with_sentence_transformers_mean(
    minilm, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files, encoder = minilm
    ids = token_ids(files, [GUITAR, PARAPHRASE, UNRELATED])
    reference = AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    mask = (ids != files.pad_id).long()
    with torch.no_grad():
        states = reference(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        ours = encoder(ids)
    # sentence-transformers' Pooling(mode="mean")
    weight = mask.unsqueeze(-1).float()
    expected = (states * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_minilm_structure(minilm) -> None:
    files, encoder = minilm
    assert len(encoder.blocks) == 6 and encoder.feature_dim == 384
    assert encoder.embed is encoder.model.embeddings
    assert files.weights_file == "model.safetensors"
    assert files.weights_sha256 == pretrained.MINILM_SHA256
    # embed and blocks are views: each tensor has one name in the state dict
    assert all(key.startswith("model.") for key in encoder.state_dict())


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


def test_wrong_path_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as err:
        read_pretrained_dir(missing)
    one_line_naming(err, missing)
    assert "does not exist" in str(err.value)


def copy_without_weights(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    return target


def test_directory_without_weights_is_one_line(minilm_dir: Path, tmp_path: Path) -> None:
    bare = copy_without_weights(minilm_dir, tmp_path / "bare")
    with pytest.raises(CheckpointError) as err:
        read_pretrained_dir(bare)
    one_line_naming(err, bare)
    assert "no weights file" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_are_one_line(minilm_dir: Path, tmp_path: Path, damage: str) -> None:
    broken = copy_without_weights(minilm_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    if damage == "truncated":
        with (minilm_dir / "model.safetensors").open("rb") as f:
            weights.write_bytes(f.read(1_000_000))
    else:
        weights.write_bytes(b"not a safetensors file" * 100)
    with pytest.raises(CheckpointError) as err:
        read_pretrained_dir(broken)
    one_line_naming(err, weights)
    assert "corrupt" in str(err.value)


def test_weights_that_do_not_fit_the_config_are_one_line(minilm_dir: Path, tmp_path: Path) -> None:
    other = copy_without_weights(minilm_dir, tmp_path / "other")
    (other / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(
        config.replace('"num_hidden_layers": 6', '"num_hidden_layers": 5')
    )
    with pytest.raises(CheckpointError) as err:
        read_pretrained_dir(other)
    one_line_naming(err, other)
    assert "do not fit" in str(err.value) and "encoder.layer.5" in str(err.value)


def test_no_tokenizer_is_one_line(minilm_dir: Path, tmp_path: Path) -> None:
    untokenized = tmp_path / "untokenized"
    shutil.copytree(minilm_dir, untokenized, ignore=shutil.ignore_patterns("tokenizer*", "vocab*"))
    with pytest.raises(CheckpointError) as err:
        read_pretrained_dir(untokenized)
    one_line_naming(err, untokenized)


def test_install_refuses_weights_of_another_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pretrained.MINILM_SHA256
    monkeypatch.setattr(pretrained, "MINILM_SHA256", "0" * 64)
    target = tmp_path / "minilm"
    with pytest.raises(CheckpointError) as err:
        install_minilm(target)
    message = str(err.value)
    assert "model.safetensors" in message and "0" * 64 in message
    assert real in message  # the hash the packaged file has
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing left behind


def test_install_twice_does_nothing_the_second_time(
    minilm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (minilm_dir / "config.json").stat().st_mtime_ns
    pretrained.main([str(minilm_dir)])
    assert "nothing to do" in capsys.readouterr().out
    assert (minilm_dir / "config.json").stat().st_mtime_ns == before


# ---- our own encoder


def small_encoder(seed: int = 0, pad_id: int = 0) -> TextEncoder:
    encoder = TextEncoder(
        vocab_size=50, width=16, layers=2, heads=2, ff_width=32, max_tokens=32, pad_id=pad_id
    )
    generator = torch.Generator().manual_seed(seed)
    for module in encoder.modules():
        if list(module.parameters(recurse=False)) and not seeded_init(module, generator):
            torch.nn.init.normal_(module.weight, 0, 0.3, generator=generator)  # Linear layers
            torch.nn.init.normal_(module.bias, 0, 0.3, generator=generator)
    return encoder


def random_ids(batch: int, length: int, pad_id: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, length), generator=g)
    ids[ids == pad_id] = pad_id + 1
    lengths = torch.randint(3, length + 1, (batch, 1), generator=g)
    ids[torch.arange(length) >= lengths] = pad_id
    return ids


def test_text_encoder_shapes() -> None:
    encoder = small_encoder()
    ids = random_ids(4, 12)
    assert encoder.token_states(ids).shape == (4, 12, 16)
    assert encoder(ids).shape == (4, encoder.feature_dim) == (4, 16)
    assert len(encoder.blocks) == 2
    assert MaskedLmHead(16, 50)(encoder.token_states(ids)).shape == (4, 12, 50)


def test_padding_does_not_change_features() -> None:
    encoder = small_encoder(pad_id=3)
    text = torch.tensor([[5, 9, 11, 20, 7, 8]])  # no 3 in it
    short, long = (F.pad(text, (0, n - text.shape[1]), value=3) for n in (16, 32))
    torch.testing.assert_close(encoder(short), encoder(long), atol=1e-6, rtol=0)
    # and padding does count where it is not padding: another pad id changes the features
    assert not torch.allclose(encoder(short), small_encoder(pad_id=0)(short), atol=1e-3)


def test_eval_equals_train_for_the_same_weights() -> None:
    """torch's own layer takes a fused fast path in eval under no_grad (other rounding); ours
    never does, so evaluating a member is bit for bit what training computed."""
    encoder = small_encoder()
    ids = random_ids(8, 20)
    trained = encoder.train()(ids)
    with torch.no_grad():
        evaluated = encoder.eval()(ids)
    assert torch.equal(trained, evaluated)
    # and it is torch's post-LN layer: the same numbers as nn.TransformerEncoderLayer in train
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.0, "gelu", batch_first=True)
    layer.load_state_dict(encoder.blocks[0].state_dict())
    x, pad = torch.randn(8, 20, 16), ids == 0
    torch.testing.assert_close(
        layer.train()(x, src_key_padding_mask=pad)[~pad],
        encoder.blocks[0](x, src_key_padding_mask=pad)[~pad],
        atol=1e-6,
        rtol=0,
    )


def test_seeded_init_is_reproducible_and_differs_by_seed() -> None:
    first, again, other = (small_encoder(seed).state_dict() for seed in (1, 1, 2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    drawn = [k for k in first if "norm" not in k and not k.endswith("in_proj_bias")]
    assert all(not torch.equal(first[k], other[k]) for k in drawn if "out_proj.bias" not in k)
    encoder = small_encoder()
    assert encoder.embed.tokens.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(encoder.blocks[0].norm1.weight, torch.ones(16))
    assert not encoder.blocks[0].self_attn.in_proj_bias.any()
    assert not encoder.blocks[0].self_attn.out_proj.bias.any()  # as torch's MHA zeroes it


def test_seeded_init_leaves_plain_linear_to_the_caller() -> None:
    assert not seeded_init(torch.nn.Linear(2, 2), torch.Generator())


# --- the off-the-shelf encoder through the stages ------------------------------------------------


@pytest.fixture(scope="module")
def off_the_shelf(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny text study with MiniLM in place of pretraining: prepare, pretrain and extract
    run in-process (nothing recorded), as the stages run them."""
    from tasks.config.params import load_params
    from tasks.extract import extract
    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout
    from tests.helpers import REPO

    params = load_params(
        REPO / "tests" / "params.text.tiny.yaml",
        [
            "model.backbone=pretrained",
            f"model.pretrained_path={minilm_dir}",
            "finetune.strategies=[scratch,linear_probe,partial]",
            "finetune.freeze_blocks=5",
        ],
    )
    layout = Layout(tmp_path_factory.mktemp("ws"))
    prepare(params, layout, Recorder())
    pretrain(params, "source", layout, Recorder())
    extract(params, "near", layout, Recorder())
    return params, layout


def test_off_the_shelf_pretrain_records_the_weights_it_took(off_the_shelf, minilm) -> None:
    from tasks.data.datasets import load_meta
    from tasks.models.classifier import load_checkpoint

    params, layout = off_the_shelf
    files, _ = minilm
    origin = load_meta(layout.prepared("source"))["pretrained"]
    assert origin == {
        "path": str(params.model.pretrained_path),
        "sha256": pretrained.MINILM_SHA256,
    }
    payload = load_checkpoint(layout.checkpoint("source"))
    assert payload["arch"]["name"] == "pretrained"
    assert payload["arch"]["config"]["num_hidden_layers"] == 6
    # the encoder's own tokenizer, set to cut and pad to max_tokens as `prepare` encoded
    saved, own = Tokenizer.from_str(payload["tokenizer"]), Tokenizer.from_str(files.tokenizer_json)
    assert saved.get_vocab() == own.get_vocab()
    assert saved.padding["length"] == params.text.max_tokens
    weights = files.state_dict["embeddings.word_embeddings.weight"]
    assert torch.equal(
        payload["state_dict"]["backbone.model.embeddings.word_embeddings.weight"], weights
    )


def test_off_the_shelf_features_are_minilm_mean_pooled(off_the_shelf, minilm) -> None:
    from tasks.data.datasets import load_split

    _, layout = off_the_shelf
    _, encoder = minilm
    ids = load_split(layout.prepared("near"), "val").x  # (N, max_tokens) from MiniLM's tokenizer
    features = load_split(layout.features("near", "source"), "val").x  # (N, 384)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(ids[:8])).numpy()
    assert features.shape == (len(ids), 384)
    torch.testing.assert_close(
        torch.from_numpy(features[:8]), torch.from_numpy(expected), rtol=1e-4, atol=1e-5
    )


def test_off_the_shelf_pretrain_refuses_weights_changed_since_prepare(off_the_shelf) -> None:
    from tasks.data.datasets import load_meta
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace import files

    params, layout = off_the_shelf
    meta_path = layout.prepared("source") / "meta.json"
    meta = load_meta(layout.prepared("source"))
    before = layout.checkpoint("source").read_bytes()
    files.write_json(meta_path, {**meta, "pretrained": {**meta["pretrained"], "sha256": "0" * 64}})
    try:
        with pytest.raises(CheckpointError, match="changed since `prepare`") as err:
            pretrain(params, "source", layout, Recorder())
        assert "\n" not in str(err.value) and str(params.model.pretrained_path) in str(err.value)
        assert (
            layout.checkpoint("source").read_bytes() == before
        )  # the earlier checkpoint is intact
    finally:
        files.write_json(meta_path, meta)


def test_scratch_builds_minilm_architecture_seeded(minilm) -> None:
    from tasks.models.classifier import build_classifier

    files, _ = minilm
    arch = {"name": "pretrained", "config": files.config, "pad_id": files.pad_id}
    first, again, other = (build_classifier(arch, 3, seed) for seed in (0, 0, 1))
    name = "backbone.model.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(first.state_dict()[name], again.state_dict()[name])
    assert not torch.equal(first.state_dict()[name], other.state_dict()[name])
    assert not torch.equal(
        first.state_dict()[name].float(), files.state_dict[name.removeprefix("backbone.model.")]
    )


def test_a_missing_encoder_directory_is_one_line(tmp_path: Path) -> None:
    from tasks.config.params import ParamsError, load_params
    from tests.helpers import REPO

    with pytest.raises(ParamsError) as err:
        load_params(
            REPO / "tests" / "params.text.tiny.yaml",
            ["model.backbone=pretrained", f"model.pretrained_path={tmp_path / 'nowhere'}"],
        )
    assert "model.pretrained_path" in str(err.value) and "nowhere" in str(err.value)
    assert "\n" not in str(err.value)


def test_pretrain_refuses_texts_tokenised_for_another_encoder(
    minilm_dir: Path, tmp_path: Path
) -> None:
    """`prepare` ran for our own encoder; the off-the-shelf one must not read those ids."""
    from tasks.config.params import load_params
    from tasks.prepare import prepare
    from tasks.pretrain import pretrain
    from tasks.recording.recorder import Recorder
    from tasks.workspace.layout import Layout
    from tests.helpers import REPO

    tiny = REPO / "tests" / "params.text.tiny.yaml"
    layout = Layout(tmp_path / "ws")
    prepare(load_params(tiny), layout, Recorder())
    swapped = load_params(
        tiny,
        [
            "model.backbone=pretrained",
            f"model.pretrained_path={minilm_dir}",
            "finetune.freeze_blocks=5",
        ],
    )
    with pytest.raises(CheckpointError, match="run prepare again") as err:
        pretrain(swapped, "source", layout, Recorder())
    assert "our own" in str(err.value) and "\n" not in str(err.value)
    assert not layout.checkpoint("source").exists()


def test_more_tokens_than_the_encoder_has_positions_is_refused(tmp_path: Path) -> None:
    from tasks.config.params import ParamsError, load_params
    from tests.helpers import REPO

    encoder = tmp_path / "short-encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(
        '{"model_type": "bert", "num_hidden_layers": 4, "max_position_embeddings": 32}'
    )
    overrides = ["model.backbone=pretrained", f"model.pretrained_path={encoder}"]
    tiny = REPO / "tests" / "params.text.tiny.yaml"
    with pytest.raises(ParamsError, match=r"text\.max_tokens \(48\) exceeds the 32 positions"):
        load_params(tiny, [*overrides, "text.max_tokens=48"])
    assert load_params(tiny, [*overrides, "text.max_tokens=32"]).text.max_tokens == 32
