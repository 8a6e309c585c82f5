"""Transformer blocks and the stacks built from them.

Post-LN (the original Transformer, BERT) normalises after each residual: x = LN(x + F(x)).
Pre-LN (GPT-2, ViT) normalises inside the branch, x = x + F(LN(x)), and its stack ends with a norm.
Blocks say which stack they fit (``role``): encoder, decoder (with cross-attention) or causal
(decoder-only, GPT).

Every block has one constructor, ``cls(d_model, heads, d_ff, dropout, activation, parts, rotary, drop_path)``,
plus its own keyword options (a Conformer's ``kernel_size``). ``parts`` names its sublayers in the
registry (:class:`Parts`); a block has defaults of its own (Llama: RMSNorm and a gated feed-forward),
and a config may name others (``feed_forward: glu`` in a post-LN encoder). ``rotary``, a position that
acts on queries and keys, is shared by the self-attention of every block of a stack.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import Tensor, nn

from tfkit import registry
from tfkit.errors import UsageError
from tfkit.nn.attention import KVCache
from tfkit.nn.dropout import Dropout
from tfkit.nn.linear import Linear
from tfkit.registry import register

register("activation", "relu")(nn.ReLU)
register("activation", "gelu")(nn.GELU)
register("activation", "swish")(nn.SiLU)


@register("activation", "gelu_tanh")
class TanhGELU(nn.GELU):
    """GELU's tanh approximation, 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))), as GPT-2 uses ("gelu_new")."""

    def __init__(self):
        super().__init__(approximate="tanh")


register("norm", "layer_norm")(nn.LayerNorm)
register("norm", "rms_norm")(nn.RMSNorm)


@register("feed_forward", "mlp")
class FeedForward(nn.Module):
    """Position-wise feed-forward: W₂·act(W₁x + b₁) + b₂."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str, bias: bool = True):
        super().__init__()
        self.up = Linear(d_model, d_ff, bias=bias)
        self.act = registry.get("activation", activation)()
        self.dropout = Dropout(dropout)
        self.down = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.up(x, self.act)))


@register("feed_forward", "glu")
class GatedFeedForward(nn.Module):
    """Gated feed-forward: W₂·(act(W_g x) ⊙ W₁x); with swish it is SwiGLU, with gelu GeGLU (Shazeer, 2020)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str, bias: bool = True):
        super().__init__()
        self.gate_up = Linear(d_model, 2 * d_ff, bias=bias)  # [W_g; W₁] in one product
        self.act = registry.get("activation", activation)()
        self.dropout = Dropout(dropout)
        self.down = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.dropout(self.act(gate) * up))


@dataclass(frozen=True)
class Parts:
    """The registry names of a block's sublayers; ``None`` in a config keeps the block's own."""

    attention: str = "multi_head"
    feed_forward: str = "mlp"
    norm: str = "layer_norm"

    def given(self, **names: str | None) -> Parts:
        """These parts with the names that are set replacing the defaults."""
        return replace(self, **{k: v for k, v in names.items() if v is not None})

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def attention_layer(
        self, d_model: int, heads: int, dropout: float, bias: bool, rotary: nn.Module | None, use: str
    ) -> nn.Module:
        """The attention layer for ``use``: self, causal (self-attention that sees no later position) or cross."""
        cls = registry.get("attention", self.attention)
        if use not in cls.uses:
            raise UsageError(
                f"attention '{self.attention}' cannot be {use}-attention (it is for {', '.join(cls.uses)}; "
                f"valid for {use}: {', '.join(n for n in registry.names('attention') if use in registry.get('attention', n).uses)})"
            )
        return cls(d_model, heads, dropout, bias, rotary)

    def feed_forward_layer(self, d_model: int, d_ff: int, dropout: float, activation: str, bias: bool) -> nn.Module:
        return registry.get("feed_forward", self.feed_forward)(d_model, d_ff, dropout, activation, bias)

    def norm_layer(self, d_model: int) -> nn.Module:
        return registry.get("norm", self.norm)(d_model)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for whole samples with probability p and
    scale the kept ones by 1/(1-p) (Huang et al., 2016)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.size(0), *(1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class EncoderBlock(nn.Module):
    """Self-attention and feed-forward sublayers, each with a residual connection and a norm."""

    role = "encoder"
    norm_first = False
    parts = Parts()
    bias = True

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        parts: Parts | None = None,
        rotary: nn.Module | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        parts = parts or self.parts
        self.self_attn = parts.attention_layer(d_model, heads, dropout, self.bias, rotary, "self")
        self.feed_forward = parts.feed_forward_layer(d_model, d_ff, dropout, activation, self.bias)
        self.norm1 = parts.norm_layer(d_model)
        self.norm2 = parts.norm_layer(d_model)
        self.dropout = Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None, outputs: int | None = None) -> Tensor:
        """(B, T, D) → (B, T, D); with ``outputs`` only the first ``outputs`` positions come out, their
        queries attending to every position, and the others cost nothing past the key and value projections."""

        def branch(sublayer_output: Tensor) -> Tensor:
            return self.drop_path(self.dropout(sublayer_output))

        def attend(h: Tensor) -> Tensor:
            return self.self_attn(h, mask=mask, queries=outputs)

        if self.norm_first:
            x = x[:, :outputs] + branch(attend(self.norm1(x)))
            return x + branch(self.feed_forward(self.norm2(x)))
        x = self.norm1(x[:, :outputs] + branch(attend(x)))
        return self.norm2(x + branch(self.feed_forward(x)))


@register("block", "post_ln")
class PostLNEncoderBlock(EncoderBlock):
    """Encoder block with a norm after each residual, x = LN(x + F(x)) (Vaswani et al., 2017)."""


@register("block", "pre_ln")
class PreLNEncoderBlock(EncoderBlock):
    """Encoder block with a norm before each sublayer, x = x + F(LN(x)) (Xiong et al., 2020)."""

    norm_first = True


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, and feed-forward sublayers."""

    role = "decoder"
    norm_first = False
    parts = Parts()
    bias = True

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        parts: Parts | None = None,
        rotary: nn.Module | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        parts = parts or self.parts
        self.self_attn = parts.attention_layer(d_model, heads, dropout, self.bias, rotary, "causal")
        self.cross_attn = parts.attention_layer(
            d_model, heads, dropout, self.bias, None, "cross"
        )  # two sequences: no shared positions
        self.feed_forward = parts.feed_forward_layer(d_model, d_ff, dropout, activation, self.bias)
        self.norm1 = parts.norm_layer(d_model)
        self.norm2 = parts.norm_layer(d_model)
        self.norm3 = parts.norm_layer(d_model)
        self.dropout = Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        cache: tuple[KVCache, KVCache] | None = None,
    ) -> Tensor:
        """With a cache, ``x`` holds only the new positions and attends to every cached one."""
        self_cache, cross_cache = cache if cache is not None else (None, None)

        def self_attn(h: Tensor) -> Tensor:
            return self.self_attn(h, causal=True, cache=self_cache)

        def cross_attn(h: Tensor) -> Tensor:
            return self.cross_attn(h, memory, mask=memory_mask, cache=cross_cache)

        for sublayer, norm in ((self_attn, self.norm1), (cross_attn, self.norm2), (self.feed_forward, self.norm3)):
            branch = self.drop_path(self.dropout(sublayer(norm(x) if self.norm_first else x)))
            x = x + branch if self.norm_first else norm(x + branch)
        return x


@register("block", "post_ln_decoder")
class PostLNDecoderBlock(DecoderBlock):
    """Decoder block with a norm after each residual (Vaswani et al., 2017)."""


@register("block", "pre_ln_decoder")
class PreLNDecoderBlock(DecoderBlock):
    """Decoder block with a norm before each sublayer (Xiong et al., 2020)."""

    norm_first = True


class CausalBlock(nn.Module):
    """Decoder-only block: causal self-attention and feed-forward, each x = x + F(norm(x))."""

    role = "causal"
    norm_first = True
    parts = Parts()
    bias = True

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float = 0.0,
        activation: str = "gelu",
        parts: Parts | None = None,
        rotary: nn.Module | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        parts = parts or self.parts
        self.norm1 = parts.norm_layer(d_model)
        self.self_attn = parts.attention_layer(d_model, heads, dropout, self.bias, rotary, "causal")
        self.norm2 = parts.norm_layer(d_model)
        self.feed_forward = parts.feed_forward_layer(d_model, d_ff, dropout, activation, self.bias)
        self.dropout = Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, T, D) → (B, T, D); with a cache ``x`` holds only the new positions."""
        x = x + self.drop_path(self.dropout(self.self_attn(self.norm1(x), causal=True, cache=cache)))
        return x + self.drop_path(self.dropout(self.feed_forward(self.norm2(x))))


@register("block", "gpt")
class GPTBlock(CausalBlock):
    """Decoder-only block as in GPT-2: LayerNorm before each sublayer, an MLP, biases (Radford et al., 2019)."""


@register("block", "llama")
class LlamaBlock(CausalBlock):
    """Decoder-only block as in Llama: RMSNorm, a gated feed-forward, no biases (Touvron et al., 2023)."""

    parts = Parts(feed_forward="glu", norm="rms_norm")
    bias = False


def block_class(name: str, role: str) -> type[nn.Module]:
    """The block ``name``, refused in one line unless it fits a stack of ``role``."""
    cls = registry.get("block", name)
    if getattr(cls, "role", None) != role:
        valid = [n for n in registry.names("block") if getattr(registry.get("block", n), "role", None) == role]
        raise UsageError(f"block '{name}' does not fit the {role} (valid {role} blocks: {', '.join(valid)})")
    return cls


class Stack(nn.Module):
    """``layers`` blocks of one registry name, a final norm when the blocks are pre-norm, and a
    rotary position shared by every block's self-attention.

    ``attention``, ``feed_forward`` and ``norm`` name the blocks' parts (``None``: the block's own);
    ``drop_path`` (stochastic depth) rises linearly from 0 at the first block to its value at the
    last; other ``options`` go to each block (a Conformer block's kernel size)."""

    role: str

    def __init__(
        self,
        block: str,
        layers: int,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float,
        activation: str,
        rotary: nn.Module | None = None,
        drop_path: float = 0.0,
        attention: str | None = None,
        feed_forward: str | None = None,
        norm: str | None = None,
        **options,
    ):
        super().__init__()
        cls = block_class(block, self.role)
        parts = cls.parts.given(attention=attention, feed_forward=feed_forward, norm=norm)
        rates = [drop_path * i / max(1, layers - 1) for i in range(layers)]
        self.layers = nn.ModuleList(
            cls(d_model, heads, d_ff, dropout, activation, parts, rotary, rate, **options) for rate in rates
        )
        self.norm = parts.norm_layer(d_model) if cls.norm_first else nn.Identity()


class Encoder(Stack):
    """A stack of encoder blocks."""

    role = "encoder"

    def forward(self, x: Tensor, mask: Tensor | None = None, outputs: int | None = None) -> Tensor:
        """(B, T, D) → (B, T, D), or with ``outputs`` only the first ``outputs`` positions (a classifier
        reading [CLS] alone): the last block then computes just those (:class:`EncoderBlock`)."""
        for layer in self.layers[:-1]:
            x = layer(x, mask)
        x = self.layers[-1](x, mask) if outputs is None else self.layers[-1](x, mask, outputs)
        return self.norm(x)


class Decoder(Stack):
    """A stack of decoder blocks; :meth:`new_cache` makes the per-layer caches for incremental decoding."""

    role = "decoder"

    def new_cache(self, length: int = 16) -> list[tuple[KVCache, KVCache]]:
        """(self-attention, cross-attention) caches per layer, the first with room for ``length``
        tokens, so decoding that many never copies them to grow (the second takes the source's size)."""
        return [(KVCache(length), KVCache(0)) for _ in self.layers]

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
    ) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, memory_mask, None if cache is None else cache[i])
        return self.norm(x)


class CausalDecoder(Stack):
    """A stack of causal blocks; :meth:`new_cache` makes the caches for generation."""

    role = "causal"

    def new_cache(self, length: int = 16) -> list[KVCache]:
        return [KVCache(length) for _ in self.layers]

    def forward(self, x: Tensor, cache: list[KVCache] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i])
        return self.norm(x)
