"""Embeddings that turn raw inputs into token sequences."""

from __future__ import annotations

from torch import Tensor, nn

from tfkit.registry import register


@register("embedding", "patch")
class PatchEmbedding(nn.Module):
    """Non-overlapping p×p image patches, each projected to d_model by one strided convolution (ViT)."""

    def __init__(self, channels: int, d_model: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch, stride=patch)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) → (B, (H/p)·(W/p), D), patches in row-major order."""
        return self.proj(images).flatten(2).transpose(1, 2)
