"""Attention: softmax(QKᵀ/√d + mask)·V (Vaswani et al., 2017).

One mask convention everywhere: masks are boolean, True means "may attend", and they broadcast to
(batch, heads, query, key); a floating-point mask is instead added to the scores (relative positions).
The fast path is PyTorch's fused ``scaled_dot_product_attention``, which never materialises the
weights; the explicit path computes them and passes them through ``probe`` (an ``nn.Identity``) so
:func:`tfkit.inspect.capture_attention` can read them with a hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit.errors import UsageError
from tfkit.nn.dropout import dropout as fast_dropout
from tfkit.nn.linear import Linear, linear
from tfkit.nn.position import sinusoids_at
from tfkit.registry import register


def causal_mask(queries: int, keys: int, device: torch.device | None = None) -> Tensor:
    """(queries, keys) lower-triangular mask, aligned so the last query sees every key."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


class ScaledDotProductAttention(nn.Module):
    """softmax(QKᵀ/√d_k + mask)·V over (B, H, T, d_k) queries, keys and values; fused or explicit.
    The kernel inside every attention layer, not a registry entry: a config names whole layers."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.explicit = False
        self.probe = nn.Identity()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        tq, tk = q.size(-2), k.size(-2)
        causal = causal and bool(tq > 1)  # one query is the last, which sees every key: no mask (each decoding step)
        # with dropout on the CPU PyTorch runs its unfused path anyway, with slower masks than ours
        if not self.explicit and not (dropout and q.device.type == "cpu"):
            if causal and (mask is not None or tq != tk):
                mask = causal_mask(tq, tk, q.device) if mask is None else mask & causal_mask(tq, tk, q.device)
                causal = False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        scale = q.size(-1) ** -0.5  # applied to the smaller of the queries and their scores (B, H, Tq, Tk)
        scores = (q * scale) @ k.transpose(-2, -1) if tk > q.size(-1) else q @ k.transpose(-2, -1) * scale
        if causal:
            scores = scores.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
        if mask is not None:
            scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        weights = self.probe(scores.softmax(dim=-1))
        return fast_dropout(weights, dropout) @ v


class KVCache:
    """Keys and values of the positions decoded so far, (B, H, T, d_k), grown in place.

    Self-attention appends one step at a time; cross-attention fills it once from the encoder output
    and reuses it. Beam search reorders the batch with :meth:`reorder`. The first append allocates
    room for ``capacity`` positions (or as many as it brings); a full cache doubles.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self._spare: tuple[Tensor, Tensor] | None = None  # reorder's destination, so it allocates nothing

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.size(2)
        if self.k is None or end > self.k.size(2):
            # doubling keeps appends amortised O(1) instead of a full copy per decoded token
            capacity = max(end, self.capacity if self.k is None else 2 * self.k.size(2))
            grown_k = k.new_empty(k.size(0), k.size(1), capacity, k.size(3))
            grown_v = v.new_empty(v.size(0), v.size(1), capacity, v.size(3))
            if self.k is not None:
                grown_k[:, :, : self.length] = self.k[:, :, : self.length]
                grown_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.keys_values()

    def keys_values(self) -> tuple[Tensor, Tensor]:
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index``. They are gathered into a second pair of buffers that then swap
        with the first: a fresh multi-megabyte tensor per step costs more in page faults than the copy."""
        if self.k is None:
            return
        if self._spare is None or self._spare[0].shape != self.k.shape:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        for old, new in zip((self.k, self.v), self._spare):
            torch.index_select(old[:, :, : self.length], 0, index, out=new[:, :, : self.length])
        (self.k, self.v), self._spare = self._spare, (self.k, self.v)


@register("attention", "multi_head")
class MultiHeadAttention(nn.Module):
    """Multi-head attention: h scaled dot-product heads over learned projections, concatenated."""

    uses = ("self", "causal", "cross")  # what a block may use the layer for (:class:`tfkit.nn.blocks.Parts`)

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, bias: bool = True, rotary: nn.Module | None = None):
        super().__init__()
        if d_model % heads:
            raise UsageError(f"d_model {d_model} is not divisible by heads {heads} (pick sizes where it is)")
        self.d_model, self.heads = d_model, heads
        self.rotary = rotary  # a position that acts on queries and keys (rotary), shared by the stack
        self.in_proj = Linear(d_model, 3 * d_model, bias=bias)  # [W_Q; W_K; W_V]
        self.out_proj = Linear(d_model, d_model, bias=bias)
        self.attend = ScaledDotProductAttention(dropout)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        queries: int | None = None,
    ) -> Tensor:
        """Self-attention over ``x`` (B, T, D), or cross-attention from ``x`` to ``context`` (B, S, D).

        With ``queries`` self-attention computes only the first ``queries`` positions' outputs (a
        classifier reading [CLS] alone): their queries attend to every key, and the other positions
        cost only their key and value projections.

        For cross-attention ``x`` may hold G consecutive rows per context row, (B·G, T, D): beam
        search's hypotheses of one sentence. They attend as one sequence of G·T queries, so the keys
        and values of a context row are computed, cached and read once, not once per hypothesis."""
        weight, bias, d = self.in_proj.weight, self.in_proj.bias, self.d_model
        if context is None and queries is not None:
            (q,) = self._heads(linear(x[:, :queries], weight, bias, rows=slice(0, d)), 1)
            k, v = self._heads(linear(x, weight, bias, rows=slice(d, None)), 2)
            if self.rotary is not None:
                q, k = self.rotary(q), self.rotary(k)
            x = x[:, :queries]
        elif context is None:
            q, k, v = self._heads(self.in_proj(x), 3)
            if self.rotary is not None:  # keys are rotated once, before the cache keeps them
                offset = cache.length if cache is not None else 0
                q, k = self.rotary(q, offset), self.rotary(k, offset)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            (q,) = self._heads(linear(x.reshape(context.size(0), -1, d), weight, bias, rows=slice(0, d)), 1)
            if cache is not None and cache.length:
                k, v = cache.keys_values()
            else:
                k, v = self._heads(linear(context, weight, bias, rows=slice(d, None)), 2)
                if cache is not None:
                    cache.append(k, v)
        out = self.attend(q, k, v, mask=mask, causal=causal)  # (B, H, T, d_k), or (B, H, G·T, d_k)
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], self.d_model))

    def _heads(self, projected: Tensor, parts: int) -> tuple[Tensor, ...]:
        """(B, T, parts·D) → ``parts`` tensors of (B, H, T, d_k)."""
        batch, length, _ = projected.shape
        split = projected.view(batch, length, parts, self.heads, self.d_model // self.heads)
        return split.permute(2, 0, 3, 1, 4).unbind(0)


def _by_key(by_distance: Tensor) -> Tensor:
    """Scores (..., T, 2T-1) of each query against the distances T-1 down to 1-T → the (..., T, T) view
    whose [i, j] is the score of distance i-j: column T-1-i+j of row i. Stepping to the next row moves
    one column left, so the view is a strided window on the same memory (Transformer-XL's shift, no copy).

    ``by_distance`` must start its storage, as a fresh product does: reading storage_offset() would
    break torch.compile's graph, and an offset slice would leave the window's gradient outside it."""
    *lead, length, _ = by_distance.shape
    if torch.compiler.is_exporting():  # a graph (ONNX) has no strided views of symbolic sizes: gather the same cells
        rows, columns = torch.arange(length, device=by_distance.device), torch.arange(length, device=by_distance.device)
        return by_distance.gather(-1, (length - 1 - rows[:, None] + columns).expand(*lead, length, length))
    *lead_strides, row, column = by_distance.stride()
    return by_distance.as_strided((*lead, length, length), (*lead_strides, row - column, column), (length - 1) * column)


@register("attention", "relative_multi_head")
class RelativePositionMultiHeadAttention(MultiHeadAttention):
    """Self-attention with Transformer-XL relative positions (Dai et al., 2019), as in the Conformer.

    score(i, j) = [(q_i + u)·k_j + (q_i + v)·W_R·R(i-j)] / √d_k, with R the sinusoids of the relative
    distance and u, v learned per head: content and position each get their own global bias.
    """

    uses = ("self",)

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, bias: bool = True, rotary: nn.Module | None = None):
        if rotary is not None:
            raise UsageError(
                "relative_multi_head attention has relative positions of its own: it takes no rotary "
                "position (choose another position, or attention multi_head)"
            )
        super().__init__(d_model, heads, dropout, bias)
        d_k = d_model // heads
        self.pos_proj = Linear(d_model, d_model, bias=False)  # W_R
        self.content_bias = nn.Parameter(torch.empty(heads, 1, d_k))  # u
        self.position_bias = nn.Parameter(torch.empty(heads, 1, d_k))  # v
        nn.init.xavier_uniform_(self.content_bias)
        nn.init.xavier_uniform_(self.position_bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        queries: int | None = None,
    ) -> Tensor:
        if context is not None or causal or cache is not None or queries is not None:
            raise UsageError("relative_multi_head attention is for whole-sequence encoder self-attention only (use multi_head)")
        batch, length, _ = x.shape
        q, k, v = self._heads(self.in_proj(x), 3)
        distances = torch.arange(length - 1, -length, -1, device=x.device)  # i - j from T-1 down to 1-T
        heads, d_k = self.heads, self.d_model // self.heads
        relative = self.pos_proj(sinusoids_at(distances, self.d_model).to(x.dtype)) * d_k**-0.5  # (2T-1, D), scaled
        relative = relative.view(-1, heads, d_k).permute(1, 2, 0)  # (H, d_k, 2T-1)
        # one product per head of all B·T queries with all distances, rather than B·H small ones
        biased = (q + self.position_bias).transpose(0, 1).reshape(heads, batch * length, d_k)
        by_distance = (biased @ relative).view(heads, batch, length, -1).transpose(0, 1)  # (B, H, T, 2T-1)
        position_scores = _by_key(by_distance)
        if mask is not None:
            position_scores = position_scores.masked_fill(~mask, float("-inf"))
        out = self.attend(q + self.content_bias, k, v, mask=position_scores)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.d_model))
