"""`partial` fine-tuning of a text encoder from its frozen lower layers' states, computed once.

`partial` freezes a text encoder's embeddings and its lowest blocks, so every epoch of every run
would push the same texts through the same frozen layers. Here their output is computed once for
a label budget's runs (`frozen_states`), and the runs train the blocks above from it
(`UpperBlocks`): the same network and the same updates, without the repeated work (for an
off-the-shelf encoder on a CPU, most of the cost of a run). The states are computed under the
same autocast as training (bf16 on a GPU) and kept in float32.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.learning.train import autocast


@torch.no_grad()
def frozen_states(
    encoder: nn.Module, ids: np.ndarray, blocks: int, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """ids (N, L) -> (N, L, D + 1) float32: the states after the embeddings and the lowest
    `blocks` blocks, with each position's keep flag (1: a token, 0: padding) as the last
    channel, so that one array carries both through the runs' batching."""
    encoder.eval()
    chunks = []
    for start in range(0, len(ids), batch_size):
        batch = torch.from_numpy(ids[start : start + batch_size]).to(device)  # (B, L)
        with autocast(device):  # as the whole network computes them (bf16 on a GPU)
            states = encoder.lower(batch, blocks).float()  # (B, L, D)
        keep = (batch != encoder.pad_id).to(states.dtype).unsqueeze(-1)  # (B, L, 1)
        chunks.append(torch.cat([states, keep], -1).cpu())
    return torch.cat(chunks).numpy()


class UpperBlocks(nn.Module):
    """A text encoder run from `frozen_states`: packed (B, L, D + 1) -> (B, D). It holds the
    whole encoder (its `embed` and `blocks` are the encoder's, so freezing, layer-wise rates
    and checkpoints see the same parameters), and runs the blocks above the frozen ones."""

    def __init__(self, encoder: nn.Module, frozen: int):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        self.feature_dim = encoder.feature_dim

    @property
    def embed(self) -> nn.Module:
        return self.encoder.embed

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.blocks

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        states, keep = packed[..., :-1], packed[..., -1] > 0.5  # (B, L, D), (B, L)
        return self.encoder.upper(states, keep, self.frozen)
