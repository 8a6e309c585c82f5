"""BERT's encoder (Devlin et al., 2019) and its heads: token + segment embeddings with positions
(``model.position``: BERT's learned table, or sinusoidal, rotary or none), the shared post-LN block stack
with GELU (its parts by registry name), the tanh pooler over [CLS], the pretraining heads (masked LM tied
to the token embeddings, next-sentence prediction) and the fine-tuning head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit.errors import UsageError
from tfkit.nn.blocks import Encoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.position import LearnedPosition, build_position
from tfkit.recipes.bert.data import PAD


class BertEmbedding(nn.Module):
    """Token + segment embeddings, plus ``position`` where it acts on embeddings, then LayerNorm and
    dropout. The tensors keep :class:`tfkit.nn.embeddings.TokenEmbedding`'s names (``position.table``
    when learned), so saved runs and Hugging Face folders load."""

    def __init__(self, vocab_size: int, d_model: int, position: nn.Module, segments: int, dropout: float, pad_id: int = 0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.segments = nn.Embedding(segments, d_model)
        self.position = position
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> Tensor:
        """(B, T) token and segment ids → (B, T, D)."""
        x = self.position(self.tokens(token_ids) + self.segments(segment_ids))
        return self.dropout(self.norm(x))


class Bert(nn.Module):
    """BERT's encoder: embeddings, a stack of blocks, and the tanh pooler over [CLS]. A position that
    acts on queries and keys (rotary) adds nothing to the embeddings: the stack's self-attention applies it."""

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
        max_positions: int,
        norm_eps: float,
        position: str = "learned",
        attention: str | None = None,
        feed_forward: str | None = None,
        norm: str | None = None,
    ):
        super().__init__()
        embedded, rotary = build_position(position, d_model, heads, max_positions)
        self.embed = BertEmbedding(vocab_size, d_model, embedded, 2, dropout, PAD)
        self.encoder = Encoder(
            block,
            layers,
            d_model,
            heads,
            d_ff,
            dropout,
            activation,
            rotary=rotary,
            attention=attention,
            feed_forward=feed_forward,
            norm=norm,
        )
        self.pooler = nn.Linear(d_model, d_model)
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.eps = norm_eps

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids → hidden states (B, T, D) and pooled [CLS] (B, D)."""
        mask = (token_ids != PAD)[:, None, None, :]
        hidden = self.encoder(self.embed(token_ids, segment_ids), mask)
        return hidden, torch.tanh(self.pooler(hidden[:, 0]))


def init_bert_weights(model: nn.Module, norm_eps: float) -> None:
    """N(0, 0.02) for every matrix and embedding, zero biases (Devlin et al.)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.eps = norm_eps
    for module in model.modules():
        if isinstance(module, BertEmbedding):
            if isinstance(module.position, LearnedPosition):
                nn.init.normal_(module.position.table, std=0.02)
            with torch.no_grad():
                module.tokens.weight[PAD].zero_()


def build_bert(vocab_size: int, config: dict[str, Any]) -> Bert:
    m, longest = config["model"], config["data"]["max_length"]
    if longest > m["max_positions"]:
        raise UsageError(
            f"data.max_length {longest} is more than the model's {m['max_positions']} positions "
            f"(model.max_positions; a pretrained model fixes it)"
        )
    return Bert(
        vocab_size,
        m["d_model"],
        m["heads"],
        m["d_ff"],
        m["layers"],
        m["dropout"],
        m["activation"],
        m["block"],
        m["max_positions"],
        m["norm_eps"],
        m["position"],
        m["attention"],
        m["feed_forward"],
        m["norm"],
    )


class BertForPretraining(nn.Module):
    """BERT with the masked-LM head (output matrix tied to the token embeddings) and the NSP head."""

    def __init__(self, bert: Bert, norm_eps: float):
        super().__init__()
        d_model, vocab_size = bert.pooler.in_features, bert.embed.tokens.num_embeddings
        self.bert = bert
        self.mlm_transform = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.nsp = nn.Linear(d_model, 2)
        init_bert_weights(self, norm_eps)

    def forward(self, token_ids: Tensor, segment_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions`` index the flattened (B·T) tokens to predict → MLM logits (P, V), NSP logits (B, 2)."""
        hidden, pooled = self.bert(token_ids, segment_ids)
        chosen = self.mlm_transform(hidden.flatten(0, 1)[positions])
        return F.linear(chosen, self.bert.embed.tokens.weight, self.mlm_bias), self.nsp(pooled)


class BertWithHead(nn.Module):
    """BERT with dropout and a linear layer on the pooled [CLS] vector, or on every token's hidden
    state (``per_token``: tags, or qa's start and end logits)."""

    def __init__(self, bert: Bert, outputs: int, dropout: float, norm_eps: float, per_token: bool = False):
        super().__init__()
        self.bert = bert
        self.per_token = per_token
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(bert.pooler.in_features, outputs)
        init_bert_weights(self, norm_eps)

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> Tensor:
        """(B, outputs), or (B, T, outputs) per token."""
        hidden, pooled = self.bert(token_ids, segment_ids)
        return self.head(self.dropout(hidden if self.per_token else pooled))
