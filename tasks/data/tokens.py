"""Texts to token ids, in `prepare`: every text of the study is encoded once, by one tokenizer,
into (N, max_tokens) int64 ids, `[CLS] text [SEP]` then `[PAD]` up to the fixed length (longer
texts are cut). Later stages read only these ids.

The tokenizer is trained with Hugging Face `tokenizers` (byte-pair encoding: its trainer is
deterministic, WordPiece's is not, huggingface/tokenizers#1794) on the source's training texts
alone: the targets' texts, and every validation and test text, shape nothing. With
an off-the-shelf encoder (model.backbone pretrained), its own tokenizer is used instead. Either
way it is written beside the source's splits, `data/prepared/source/tokenizer.json`, and
pretraining puts it into the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from tasks.config.params import TextParams
from tasks.workspace import files

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4 in a tokenizer we train
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: np.ndarray, cfg: TextParams) -> Tokenizer:
    """A BPE tokenizer trained on `texts` (N,) str, with BERT's normalisation and
    pre-tokenisation (split on whitespace and punctuation) and the [CLS] ... [SEP] template."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=list(SPECIALS), show_progress=False
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts.tolist(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return tokenizer


def encode(tokenizer: Tokenizer, texts: np.ndarray, max_tokens: int, pad_id: int) -> np.ndarray:
    """(N,) str -> (N, max_tokens) int64 ids, cut or padded to exactly max_tokens."""
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(
        length=max_tokens, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id)
    )
    encoded = tokenizer.encode_batch(texts.tolist())
    return np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), max_tokens)


def describe(tokenizer: Tokenizer, pad_id: int, kind: str) -> dict[str, Any]:
    """What later stages need to know of the ids (kept in every text dataset's meta.json)."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIALS}  # None: not in it
    return {
        "tokenizer": kind,  # bpe, or pretrained (the encoder's own)
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": pad_id,
        "mask_id": ids["[MASK]"],
        "special_ids": sorted(i for i in ids.values() if i is not None),
        # MLM never chooses these positions ([UNK] it does: a text of unknown words only still
        # has tokens to predict)
        "never_masked": sorted(
            ids[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if ids[t] is not None
        ),
    }


def save(tokenizer: Tokenizer, path: Path) -> None:
    files.write_text(path, tokenizer.to_str())
