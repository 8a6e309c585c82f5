"""The encoder-decoder Transformer (Vaswani et al., 2017), assembled from registry parts by name, and
the two graphs an ONNX export runs it as (the encoder once, then the decoder step by step).

One embedding matrix serves the source, the target and the output layer. The position is placed
where it acts (:func:`tfkit.nn.position.build_position`): added to the embeddings (sinusoidal,
learned), or rotating the queries and keys of every self-attention in both stacks (rotary; the
decoder's rotates each new token by its place after the cached ones, so cached decoding is exact).
Blocks take their attention, feed-forward and norm by registry name (``None``: the block's own).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tfkit.nn.blocks import Decoder, Encoder, Parts
from tfkit.nn.dropout import Dropout
from tfkit.nn.linear import linear
from tfkit.nn.losses import linear_cross_entropy
from tfkit.nn.position import build_position
from tfkit.onnx import GivenCache
from tfkit.recipes.translation.data import PAD

MAX_POSITIONS = 1024


def parts(stack: dict[str, Any]) -> dict[str, str | None]:
    """A stack config's part names (a run saved before parts were named has none: the block's own)."""
    return {key: stack.get(key) for key in Parts.keys()}


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer whose one embedding matrix serves source, target and output.

    ``encoder`` and ``decoder`` are the ``model.encoder`` / ``model.decoder`` configs: ``block``,
    ``layers``, and optionally ``attention``, ``feed_forward``, ``norm``."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float,
        activation: str,
        position: str,
        encoder: dict[str, Any],
        decoder: dict[str, Any],
    ):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.position, rotary = build_position(position, d_model, heads, MAX_POSITIONS)
        self.dropout = Dropout(dropout)
        sizes = dict(d_model=d_model, heads=heads, d_ff=d_ff, dropout=dropout, activation=activation, rotary=rotary)
        self.encoder = Encoder(encoder["block"], encoder["layers"], **sizes, **parts(encoder))
        self.decoder = Decoder(decoder["block"], decoder["layers"], **sizes, **parts(decoder))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # the output layer shares these weights, so keep logits O(1): N(0, 1/d), scaled by √d on input
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()

    def _embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        return self.dropout(self.position(self.embed(tokens) * math.sqrt(self.d_model), offset))

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        mask = (src != PAD)[:, None, None, :]  # (B, 1, 1, S): padding is never attended
        return self.encoder(self._embed(src), mask), mask

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: list | None = None, offset: int = 0) -> Tensor:
        hidden = self.decoder(self._embed(tgt, offset), memory, memory_mask, cache)
        return linear(hidden, self.embed.weight)  # (B, T, V)

    def forward(self, src: Tensor, tgt: Tensor, targets: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
        """Logits (B, T, V) for decoder inputs ``tgt``; given ``targets`` (B, T) instead the
        label-smoothed cross-entropy summed over the targets that are not padding, without keeping
        the logits (:func:`tfkit.nn.losses.linear_cross_entropy`)."""
        memory, mask = self.encode(src)
        if targets is None:
            return self.decode(tgt, memory, mask)
        hidden = self.decoder(self._embed(tgt), memory, mask)
        return linear_cross_entropy(hidden.flatten(0, 1), self.embed.weight, targets.flatten(), PAD, label_smoothing)


class EncoderGraph(nn.Module):
    """The encoder as a graph: (B, S) source ids → memory (B, S, D)."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, source_ids: Tensor) -> Tensor:
        return self.model.encode(source_ids)[0]


class DecoderStep(nn.Module):
    """One step of incremental decoding with the self-attention cache as tensors (layers, B, H, T, d_k)."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(
        self, token_ids: Tensor, memory: Tensor, source_ids: Tensor, past_keys: Tensor, past_values: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        caches = [(GivenCache(k, v), None) for k, v in zip(past_keys.unbind(0), past_values.unbind(0))]
        logits = self.model.decode(token_ids, memory, (source_ids != PAD)[:, None, None, :], caches, offset=past_keys.size(3))
        return logits[:, -1], torch.stack([c.k for c, _ in caches]), torch.stack([c.v for c, _ in caches])
