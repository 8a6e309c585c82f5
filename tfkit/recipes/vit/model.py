"""The Vision Transformer (Dosovitskiy et al., 2021): image patches as tokens, a [CLS] token, positions,
a stack of encoder blocks from the registry, a final norm and a linear head on [CLS].

Positions (``model.position``): ``learned`` is ViT's own, one trained vector per [CLS] and patch-grid
cell, bicubically resampled when the image size changes the grid; the registry's others act on the
[CLS]+patches sequence read row by row, as one dimension: ``rotary`` on every self-attention's queries
and keys, ``sinusoidal`` on the embeddings, ``none`` not at all (attention then sees a bag of patches).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tfkit.errors import UsageError
from tfkit.nn.blocks import Encoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.embeddings import PatchEmbedding
from tfkit.nn.position import build_position, resize_grid

MAX_GRID = 14  # patches a side at most: ViT-B/16's 14×14 at 224 pixels


def patch_for(image_size: int) -> tuple[int, str]:
    """The smallest patch that divides ``image_size`` into at most MAX_GRID × MAX_GRID patches."""
    patch = next(p for p in range(2, image_size + 1) if image_size % p == 0 and image_size // p <= MAX_GRID)
    grid = image_size // patch
    return patch, f"the smallest patch that cuts {image_size} px into at most {MAX_GRID}×{MAX_GRID}: {grid}×{grid} patches"


class VisionTransformer(nn.Module):
    """``attention``, ``feed_forward`` and ``norm`` name the blocks' parts in the registry (None: the block's own)."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        classes: int,
        patch: int,
        d_model: int,
        depth: int,
        heads: int,
        d_ff: int,
        dropout: float,
        drop_path: float,
        activation: str,
        block: str,
        norm_eps: float,
        position: str = "learned",
        attention: str | None = None,
        feed_forward: str | None = None,
        norm: str | None = None,
    ):
        super().__init__()
        if image_size % patch:
            raise UsageError(f"data.image_size {image_size} is not a multiple of model.patch {patch}")
        self.patch = patch
        self.grid = (image_size // patch, image_size // patch)
        self.patches = PatchEmbedding(channels, d_model, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        length = 1 + self.grid[0] * self.grid[1]  # [CLS] + patches
        self.learned = position == "learned"
        rotary = None
        if self.learned:  # a parameter of its own name, as saved runs and transformers' ViT have it
            self.position = nn.Parameter(torch.empty(length, d_model))
        else:
            try:
                self.sequence_position, rotary = build_position(position, d_model, heads, length)
            except UsageError as e:
                raise UsageError(f"model.position '{position}': {e}") from None
        self.dropout = Dropout(dropout)
        try:
            self.encoder = Encoder(
                block,
                depth,
                d_model,
                heads,
                d_ff,
                dropout,
                activation,
                rotary=rotary,
                drop_path=drop_path,
                attention=attention,
                feed_forward=feed_forward,
                norm=norm,
            )
        except UsageError as e:
            if rotary is None or attention is None:
                raise
            raise UsageError(f"model.position '{position}' with model.attention '{attention}': {e}") from None
        self.head = nn.Linear(d_model, classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.eps = norm_eps
        if self.learned:
            nn.init.trunc_normal_(self.position, std=0.02)
        # the last block may compute [CLS] alone; relative_multi_head attends whole sequences only
        last = self.encoder.layers[-1]
        self.cls_only = "cross" in getattr(getattr(last, "self_attn", None), "uses", ())

    def forward(self, images: Tensor, every_position: bool = False) -> Tensor:
        """(B, C, H, W) → class logits (B, classes); any H and W divisible by the patch size.

        Only [CLS] feeds the head, so where it can the last block computes its output at [CLS] alone:
        the same logits, and most of that block's work saved. ``every_position`` runs it in full, to
        inspect the last block's attention from every patch."""
        tokens = self.patches(images)
        x = torch.cat([self.cls.expand(tokens.size(0), -1, -1), tokens], dim=1)
        if self.learned:
            grid = (images.size(-2) // self.patch, images.size(-1) // self.patch)
            x = x + torch.cat([self.position[:1], resize_grid(self.position[1:], self.grid, grid)])
        else:
            x = self.sequence_position(x)
        cls_only = self.cls_only and not every_position
        return self.head(self.encoder(self.dropout(x), outputs=1 if cls_only else None)[:, 0])
