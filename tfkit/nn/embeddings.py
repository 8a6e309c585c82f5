"""Embeddings that turn raw inputs into token sequences. Each has arguments of its own, so they are
plain modules that a model builds, not registry entries."""

from __future__ import annotations

from torch import Tensor, nn

from tfkit.nn.dropout import Dropout
from tfkit.nn.position import LearnedPosition


class PatchEmbedding(nn.Module):
    """Non-overlapping p×p image patches, each projected to d_model by one strided convolution (ViT)."""

    def __init__(self, channels: int, d_model: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch, stride=patch)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, (H/p)·(W/p), D), patches in row-major order."""
        return self.proj(images).flatten(2).transpose(1, 2)


class TokenEmbedding(nn.Module):
    """Token + segment + learned position embeddings, then LayerNorm and dropout (BERT)."""

    def __init__(self, vocab_size: int, d_model: int, max_positions: int, segments: int, dropout: float, pad_id: int = 0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.segments = nn.Embedding(segments, d_model)
        self.position = LearnedPosition(d_model, max_positions)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> Tensor:
        """(B, T) token and segment ids → (B, T, D)."""
        x = self.position(self.tokens(token_ids) + self.segments(segment_ids))
        return self.dropout(self.norm(x))
