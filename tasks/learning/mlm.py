"""Masked-language modelling, BERT's self-supervised objective (Devlin et al. 2019): a share of
each text's tokens is chosen; of those, 80% become [MASK], 10% a random token and 10% stay as
they are; the model predicts the original token at every chosen position. Labels are not used,
so a source without any can be pretrained.

The draw of a batch depends only on the seed and the batch's key (epoch and position), never on
a generator's running state: a resumed run draws what an uninterrupted one would, and the
validation texts are masked the same way at every epoch, so their score is comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.learning.train import EVAL_KEY, DeviceData
from tasks.models.transformer import MaskedLmHead


@dataclass(frozen=True)
class MaskedTokens:
    """The MLM objective (see tasks.learning.train.Objective)."""

    mask_prob: float
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # [PAD], [UNK], [CLS], [SEP], [MASK]: never a random token
    never_masked: tuple[int, ...]  # [PAD], [CLS], [SEP], [MASK]: never chosen
    seed: int

    def inputs(
        self, x: torch.Tensor, y: torch.Tensor, key: tuple[int, ...]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """x: (B, L) token ids -> ((masked ids (B, L), chosen (B, L) bool), originals (n,))."""
        state = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        draws = torch.rand(x.shape, generator=generator).to(x.device)  # (B, L)
        action = torch.rand(x.shape, generator=generator).to(x.device)  # (B, L)
        ordinary = self.ordinary_ids()  # (V',)
        draw = torch.randint(len(ordinary), x.shape, generator=generator)  # (B, L)
        random_ids = ordinary[draw].to(x.device)  # (B, L): ordinary tokens only
        candidate = ~torch.isin(x, torch.tensor(self.never_masked, device=x.device))  # (B, L)
        draws = torch.where(candidate, draws, 2.0)  # never below mask_prob, never the least
        # at least one token of every text, so that no batch scores nothing
        least = torch.zeros_like(candidate).scatter_(1, draws.argmin(1, keepdim=True), True)
        chosen = candidate & ((draws < self.mask_prob) | least)
        masked = torch.where(chosen & (action < 0.8), self.mask_id, x)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
        return (masked, chosen), x[chosen]

    def ordinary_ids(self) -> torch.Tensor:
        """(V',) the vocabulary's ids that are not special tokens."""
        ids = torch.arange(self.vocab_size)
        return ids[~torch.isin(ids, torch.tensor(self.special_ids))]


class MaskedLm(nn.Module):
    """A text encoder with BERT's prediction head, scored at the chosen positions only (the
    head's (n, vocab) logits cost a fraction of all positions'). The head is dropped after
    pretraining; the encoder is what transfers."""

    def __init__(self, encoder: nn.Module, vocab_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = MaskedLmHead(encoder.feature_dim, vocab_size)

    def forward(self, ids: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        states = self.encoder.token_states(ids)  # (B, L, width)
        return self.head(states[chosen])  # (n, vocab)


def unigram_accuracy(
    objective: MaskedTokens, train_ids: np.ndarray, val: DeviceData, batch_size: int
) -> float:
    """The accuracy of always guessing the training texts' most frequent maskable token at the
    validation positions that `evaluate` masks (with the same `batch_size`): the baseline a
    masked-token accuracy must beat to show that the model learnt from context."""
    ordinary = train_ids[~np.isin(train_ids, objective.never_masked)]  # what can be a target
    commonest = int(np.bincount(ordinary).argmax())
    targets = [
        objective.inputs(
            val.x[start : start + batch_size], val.y[start : start + batch_size], (EVAL_KEY, start)
        )[1]
        for start in range(0, len(val), batch_size)
    ]
    return torch.cat(targets).eq(commonest).double().mean().item()
