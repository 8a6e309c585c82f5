"""Positional encodings. Each is ``cls(size, max_len)`` and says where it acts (``acts_on``);
:func:`build_position` places it there, so every model that takes a ``position`` honours it:

- ``"embeddings"`` (sinusoidal, learned, none): ``size`` is d_model; ``forward(x, offset)`` returns
  x + P[offset:offset+T] for the (B, T, D) input embeddings;
- ``"queries_keys"`` (rotary): ``size`` is the size of a head; the stack hands it to every block's
  self-attention, which calls ``forward(x, offset)`` on its (B, H, T, d_k) queries and keys.

Relative positions act as an attention bias: they are an attention layer (``relative_multi_head``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit import registry
from tfkit.errors import UsageError
from tfkit.registry import register


def sinusoids(length: int, d_model: int) -> Tensor:
    """The encodings of positions 0..length-1, (length, d_model)."""
    return sinusoids_at(torch.arange(length), d_model)


def sinusoids_at(positions: Tensor, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) for each of
    ``positions`` (relative ones may be negative), on their device; (len(positions), d_model)."""
    position = positions.float()[:, None]
    exponents = torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device)
    frequency = torch.exp(exponents * (-math.log(10000.0) / d_model))
    table = position.new_zeros(positions.size(0), d_model)  # size(0), not len(): a graph export keeps it symbolic
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


@register("position", "sinusoidal")
class SinusoidalPosition(nn.Module):
    """Fixed sine and cosine encodings of each position, added to the embeddings (Vaswani et al., 2017)."""

    acts_on = "embeddings"

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", sinusoids(max_len, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.size(1)
        if end > self.table.size(0):  # any length works: the table is a formula, not a parameter
            self.table = sinusoids(max(end, 2 * self.table.size(0)), self.d_model).to(self.table.device)
        return x + self.table[offset:end].to(x.dtype)


@register("position", "learned")
class LearnedPosition(nn.Module):
    """One trained vector per position up to max_len, added to the embeddings (BERT, ViT)."""

    acts_on = "embeddings"

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.size(1)
        if end > self.table.size(0):
            raise UsageError(f"input of {end} positions is longer than the {self.table.size(0)} learned ones")
        return x + self.table[offset:end]


@register("position", "rotary")
class RotaryPosition(nn.Module):
    """Rotary positions (Su et al., 2021): query and key features rotate in pairs by angles that grow
    with the position, so q·k depends on the two positions only through their distance.

    Pairs are the two halves of each head's features, feature i with feature i + d/2 (GPT-NeoX and
    Llama's layout), at frequencies base^(-2i/d)."""

    acts_on = "queries_keys"

    def __init__(self, head_dim: int, max_len: int = 1024, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise UsageError(f"rotary positions need an even size per head, got {head_dim} (change d_model or heads)")
        self.register_buffer(
            "frequency", base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim), persistent=False
        )

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """(..., T, d) features of positions offset..offset+T-1 → the same, rotated."""
        positions = torch.arange(offset, offset + x.size(-2), device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.frequency[None]  # (T, d/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


@register("position", "none")
class NoPosition(nn.Module):
    """No position at all: order comes only from causal masking (NoPE) or an attention layer's own."""

    acts_on = "embeddings"

    def __init__(self, size: int = 0, max_len: int = 0):
        super().__init__()

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        return x


def build_position(name: str, d_model: int, heads: int, max_len: int) -> tuple[nn.Module, nn.Module | None]:
    """The registry position ``name`` placed where it acts: (what the model applies to its input
    embeddings, what its stacks apply to queries and keys). One of the two is a no-op."""
    cls = registry.get("position", name)
    if cls.acts_on == "queries_keys":
        return NoPosition(), cls(d_model // heads, max_len)
    return cls(d_model, max_len), None


def resize_grid(table: Tensor, old: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """Learned positions of an old×old patch grid, (h·w, D), bicubically resampled to a new grid, so a
    ViT trained at one image size runs at another (Dosovitskiy et al., 2021, section 3.2)."""
    if tuple(old) == tuple(new):
        return table
    grid = table.reshape(1, *old, -1).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=tuple(new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1).to(table.dtype)
