"""The two causal language models, with one interface (``forward(ids, cache, targets)``, ``logits``,
``new_cache``, ``max_positions``): the decoder-only Transformer (GPT) assembled from the shared
registry, and the LSTM baseline the course notes read beside it."""

from __future__ import annotations

import math

from torch import Tensor, nn

from tfkit.errors import UsageError
from tfkit.nn.blocks import CausalDecoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.linear import linear
from tfkit.nn.losses import linear_cross_entropy
from tfkit.nn.position import build_position


class CausalLM(nn.Module):
    """Token embeddings, the position where it acts (on the embeddings, or on every self-attention's
    queries and keys), a causal stack of ``block`` with its parts as named (None: the block's own),
    the tied output."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        heads: int,
        d_ff: int,
        layers: int,
        dropout: float,
        activation: str,
        block: str,
        position: str,
        max_positions: int,
        attention: str | None = None,
        feed_forward: str | None = None,
        norm: str | None = None,
    ):
        super().__init__()
        self.max_positions = max_positions
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.position, rotary = build_position(position, d_model, heads, max_positions)
        self.dropout = Dropout(dropout)
        self.decoder = CausalDecoder(
            block,
            layers,
            d_model,
            heads,
            d_ff,
            dropout,
            activation,
            rotary,
            attention=attention,
            feed_forward=feed_forward,
            norm=norm,
        )
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # GPT-2: N(0, 0.02), residual outputs scaled by 1/√(2·layers)
                nn.init.normal_(
                    p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("out_proj.weight", "down.weight")) else 0.02
                )
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def new_cache(self, length: int = 16) -> list:
        return self.decoder.new_cache(length)

    def forward(self, token_ids: Tensor, cache: list | None = None, targets: Tensor | None = None) -> Tensor:
        """(B, T) ids → hidden states (B, T, D), or with ``targets`` (B, T) their cross-entropy summed
        (inside forward, so DDP and FSDP see the tied output weight used); with a cache,
        ``token_ids`` are the new positions."""
        offset = cache[0].length if cache else 0
        if offset + token_ids.size(1) > self.max_positions:
            raise UsageError(f"{offset + token_ids.size(1)} tokens are more than the model's {self.max_positions} positions")
        x = self.position(self.tokens(token_ids), offset)
        hidden = self.decoder(self.dropout(x), cache)
        if targets is None:
            return hidden
        return linear_cross_entropy(hidden.flatten(0, 1), self.tokens.weight, targets.flatten())

    def logits(self, hidden: Tensor) -> Tensor:
        return linear(hidden, self.tokens.weight)


class LSTMState:
    """The recurrent state carried between generation steps: what a KV cache is to the Transformer."""

    def __init__(self) -> None:
        self.state: tuple[Tensor, Tensor] | None = None
        self.length = 0


class LSTMLanguageModel(nn.Module):
    """The baseline the course notes read beside GPT: token embeddings, a stack of LSTMs of ``hidden``
    units whose outputs are projected back to d_model (Sak et al., 2014), the same tied output
    (Merity et al., 2018, without their regularisers). Same interface as :class:`CausalLM`."""

    def __init__(self, vocab_size: int, d_model: int, hidden: int, layers: int, dropout: float, max_positions: int):
        super().__init__()
        if hidden < d_model:
            raise UsageError(f"the LSTM's model.d_ff {hidden} (its hidden units) must be at least model.d_model {d_model}")
        self.max_positions = max_positions
        self.tokens = nn.Embedding(vocab_size, d_model)
        nn.init.uniform_(
            self.tokens.weight, -0.1, 0.1
        )  # as Zaremba et al. and Merity et al.: 0.02 left the tied logits too small to learn
        self.lstm = nn.LSTM(
            d_model,
            hidden,
            layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
            proj_size=d_model if hidden > d_model else 0,
        )
        self.dropout = Dropout(dropout)

    def new_cache(self, length: int = 16) -> list[LSTMState]:
        return [LSTMState()]

    def forward(self, token_ids: Tensor, cache: list[LSTMState] | None = None, targets: Tensor | None = None) -> Tensor:
        state = cache[0] if cache else None
        hidden, carried = self.lstm(self.dropout(self.tokens(token_ids)), state.state if state else None)
        if state is not None:
            state.state, state.length = carried, state.length + token_ids.size(1)
        hidden = self.dropout(hidden)
        if targets is None:
            return hidden
        return linear_cross_entropy(hidden.flatten(0, 1), self.tokens.weight, targets.flatten())

    def logits(self, hidden: Tensor) -> Tensor:
        return linear(hidden, self.tokens.weight)
