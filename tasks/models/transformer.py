"""A small BERT-like text encoder of our own (post-LN, mean pooled), its masked-LM head for
pretraining, and the seeded init of the layer types it adds to `classifier._reset_parameters`.

Texts arrive as token ids (B, L) int64, [CLS] ... [SEP] already added by the tokenizer and padded
at the end with `pad_id`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# BERT's initializer_range: embeddings start at N(0, 0.02) rather than PyTorch's N(0, 1), whose
# unit-norm rows would drown the LayerNorm'd sum of token and position embeddings in noise.
EMBEDDING_STD = 0.02


class EncoderLayer(nn.TransformerEncoderLayer):
    """torch's post-LN encoder layer that always computes the same way.

    `nn.TransformerEncoderLayer.forward` (and `nn.MultiheadAttention.forward` inside it) take a
    fused "fast path" (`torch._transformer_encoder_layer_fwd` / `_native_multi_head_attention`,
    nested tensors) when in eval mode with no gradients needed: other float rounding than in
    training, and a kernel that vmap cannot batch. This forward is the reference branch of the
    layer's own code, with the attention written out (see `_attend`), so the same weights give
    the same numbers in train and eval, with or without grad, and under vmap.
    The parameters, their names and the state dict are those of `nn.TransformerEncoderLayer`.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, L, D); src_key_padding_mask: (B, L) bool, True at padding
        x = self.norm1(x + self._attend(x, src_key_padding_mask))
        return self.norm2(x + self._ff_block(x))

    def _attend(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """Multi-head self-attention with the layer's own weights, written out: matmuls and a
        softmax that vmap batches natively (F.scaled_dot_product_attention's CPU flash kernel
        has no batching rule, so vmap would loop over the members one by one)."""
        attn = self.self_attn
        b, n, d = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D/H)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)  # (B, H, L, L)
        if pad is not None:  # no one attends to padding ([CLS] is never padding)
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)  # (B, L, D)
        return self.dropout1(attn.out_proj(mixed))


class Embeddings(nn.Module):
    """Token + learned position embedding, then LayerNorm (as BERT, without token types).
    The lowest "block" when freezing or decaying learning rates layer by layer."""

    def __init__(self, vocab_size: int, width: int, max_tokens: int, pad_id: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_tokens, width)  # (max_tokens, width), learned
        self.norm = nn.LayerNorm(width)
        self.pad_id = pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # positions from arange rather than a buffer: a template moved to "meta" for
        # functional_call (tasks/learning/ensemble.py) keeps no data, only parameters are swapped
        where = torch.arange(ids.shape[-1], device=ids.device)  # (L,)
        return self.norm(self.tokens(ids) + self.positions(where))  # (B, L, D)


class TextEncoder(nn.Module):
    """A BERT-like post-LN encoder, mean pooled over the non-pad tokens as sentence-transformers
    pools. ids (B, L) int64 -> (B, width)."""

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        ff_width: int,
        max_tokens: int,
        pad_id: int,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.embed = Embeddings(vocab_size, width, max_tokens, pad_id)
        # dropout 0: a run's result must depend on its seeds alone (the same numbers through
        # either orchestrator, and a vmapped ensemble equal to separate runs), and random
        # dropout masks would make it depend on the process's generator
        self.blocks = nn.ModuleList(
            EncoderLayer(width, heads, ff_width, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(layers)
        )
        self.feature_dim = width

    def lower(self, ids: torch.Tensor, blocks: int) -> torch.Tensor:
        """ids (B, L) -> (B, L, width): the states after the embeddings and the lowest `blocks`
        blocks (what `partial` freezes; tasks/models/frozen.py computes them once)."""
        pad = ids == self.pad_id  # (B, L), True where padding: attended by no one
        x = self.embed(ids)
        for block in self.blocks[:blocks]:
            x = block(x, src_key_padding_mask=pad)
        return x

    def upper(self, states: torch.Tensor, keep: torch.Tensor, blocks: int) -> torch.Tensor:
        """The blocks above the lowest `blocks`, from their states (B, L, width) with keep
        (B, L) True at tokens, mean pooled -> (B, width)."""
        for block in self.blocks[blocks:]:
            states = block(states, src_key_padding_mask=~keep)
        return mean_pool(states, keep)

    def token_states(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, width): every position's state (the masked-LM head reads it)."""
        return self.lower(ids, len(self.blocks))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(ids, 0), ids != self.pad_id, 0)  # (B, width)


def mean_pool(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean of states (B, L, D) over the positions where keep (B, L) is True -> (B, D), as
    sentence-transformers' Pooling(mode="mean") computes it (count clamped at 1e-9)."""
    weight = keep.to(states.dtype).unsqueeze(-1)  # (B, L, 1)
    return (states * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


class MaskedLmHead(nn.Module):
    """BERT's prediction head for masked-LM pretraining (dropped afterwards):
    (B, L, width) -> (B, L, vocab_size) logits."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(states))


def seeded_init(module: nn.Module, generator: torch.Generator) -> bool:
    """Init `module`'s own (recurse=False) parameters from `generator` if it is a type that
    `classifier._reset_parameters` (Linear, Conv1d) does not know; True if it did.

    - nn.Embedding (tokens and positions): N(0, 0.02), BERT's init (see EMBEDDING_STD);
    - nn.LayerNorm: weight 1, bias 0 (PyTorch's and BERT's);
    - nn.MultiheadAttention: in_proj_weight xavier_uniform, in_proj_bias 0, as its own
      `_reset_parameters`; its `out_proj` is a Linear of its own (below).
    - MHA's out_proj (NonDynamicallyQuantizableLinear, a Linear): Linear's kaiming weight and,
      as torch's MHA does, a zero bias. Only if the caller asks here before treating Linears:

        for module in model.modules():
            if not list(module.parameters(recurse=False)) or seeded_init(module, generator):
                continue
            if not isinstance(module, nn.Linear | nn.Conv1d):
                raise TypeError(...)
            ...  # Linear / Conv1d as now

    (Called after the Linear branch instead, out_proj gets Linear's uniform bias: also fine.)
    """
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, EMBEDDING_STD, generator=generator)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim or module.bias_k is not None:
                return False  # separate q/k/v projections or bias_k/v: not used here
            nn.init.xavier_uniform_(module.in_proj_weight, generator=generator)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            return False
    return True
