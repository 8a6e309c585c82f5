"""Transformer blocks and the stacks built from them.

Post-LN (the original Transformer, BERT) normalises after each residual: x = LN(x + F(x)).
Pre-LN (GPT-2, ViT) normalises inside the branch, x = x + F(LN(x)), and its stack ends with a LayerNorm.
Blocks say which stack they fit (``role``): encoder, decoder (with cross-attention) or causal
(decoder-only, GPT). Feed-forwards are ``cls(d_model, d_ff, dropout, activation, bias)``; norms ``cls(d_model)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from tfkit import registry
from tfkit.errors import UsageError
from tfkit.nn.attention import KVCache, MultiHeadAttention
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
    """Self-attention and feed-forward sublayers, each with a residual connection and LayerNorm."""

    role = "encoder"
    norm_first = False

    def __init__(
        self, d_model: int, heads: int, d_ff: int, dropout: float = 0.1, activation: str = "relu", drop_path: float = 0.0
    ):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None, outputs: int | None = None) -> Tensor:
        """(B, T, D) → (B, T, D); with ``outputs`` only the first ``outputs`` positions come out, their
        queries attending to every position, and the others cost nothing past the key and value projections."""

        def branch(sublayer_output: Tensor) -> Tensor:
            return self.drop_path(self.dropout(sublayer_output))

        def attend(h: Tensor) -> Tensor:  # attention from the first ``outputs`` positions is cross-attention to all
            return self.self_attn(h, mask=mask) if outputs is None else self.self_attn(h[:, :outputs], h, mask=mask)

        if self.norm_first:
            x = x[:, :outputs] + branch(attend(self.norm1(x)))
            return x + branch(self.feed_forward(self.norm2(x)))
        x = self.norm1(x[:, :outputs] + branch(attend(x)))
        return self.norm2(x + branch(self.feed_forward(x)))


@register("block", "post_ln")
class PostLNEncoderBlock(EncoderBlock):
    """Encoder block with LayerNorm after each residual, x = LN(x + F(x)) (Vaswani et al., 2017)."""


@register("block", "pre_ln")
class PreLNEncoderBlock(EncoderBlock):
    """Encoder block with LayerNorm before each sublayer, x = x + F(LN(x)) (Xiong et al., 2020)."""

    norm_first = True


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, and feed-forward sublayers."""

    role = "decoder"
    norm_first = False

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

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
            x = x + self.dropout(sublayer(norm(x))) if self.norm_first else norm(x + self.dropout(sublayer(x)))
        return x


@register("block", "post_ln_decoder")
class PostLNDecoderBlock(DecoderBlock):
    """Decoder block with LayerNorm after each residual (Vaswani et al., 2017)."""


@register("block", "pre_ln_decoder")
class PreLNDecoderBlock(DecoderBlock):
    """Decoder block with LayerNorm before each sublayer (Xiong et al., 2020)."""

    norm_first = True


class CausalBlock(nn.Module):
    """Decoder-only block: causal self-attention and feed-forward, each x = x + F(norm(x))."""

    role = "causal"
    norm_first = True
    norm = "layer_norm"
    feed_forward_kind = "mlp"
    bias = True

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float = 0.0, activation: str = "gelu",
                 rotary: nn.Module | None = None):
        super().__init__()
        norm = registry.get("norm", self.norm)
        self.norm1 = norm(d_model)
        self.self_attn = MultiHeadAttention(d_model, heads, dropout, bias=self.bias, rotary=rotary)
        self.norm2 = norm(d_model)
        self.feed_forward = registry.get("feed_forward", self.feed_forward_kind)(d_model, d_ff, dropout, activation, self.bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, T, D) → (B, T, D); with a cache ``x`` holds only the new positions."""
        x = x + self.dropout(self.self_attn(self.norm1(x), causal=True, cache=cache))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


@register("block", "gpt")
class GPTBlock(CausalBlock):
    """Decoder-only block as in GPT-2: LayerNorm before each sublayer, an MLP, biases (Radford et al., 2019)."""


@register("block", "llama")
class LlamaBlock(CausalBlock):
    """Decoder-only block as in Llama: RMSNorm, a gated feed-forward, no biases (Touvron et al., 2023)."""

    norm = "rms_norm"
    feed_forward_kind = "glu"
    bias = False


def _block_class(name: str, role: str) -> type[nn.Module]:
    cls = registry.get("block", name)
    if getattr(cls, "role", None) != role:
        valid = [n for n in registry.names("block") if getattr(registry.get("block", n), "role", None) == role]
        raise UsageError(f"block '{name}' does not fit the {role} (valid {role} blocks: {', '.join(valid)})")
    return cls


class Encoder(nn.Module):
    """A stack of encoder blocks named by the registry; a pre-LN stack ends with a LayerNorm.
    Stochastic depth rises linearly from 0 at the first block to ``drop_path`` at the last;
    ``block_options`` go to each block (a Conformer block's kernel size and attention)."""

    def __init__(
        self, block: str, layers: int, d_model: int, heads: int, d_ff: int, dropout: float, activation: str,
        drop_path: float = 0.0, **block_options,
    ):
        super().__init__()
        cls = _block_class(block, "encoder")
        rates = [drop_path * i / max(1, layers - 1) for i in range(layers)]
        self.layers = nn.ModuleList(cls(d_model, heads, d_ff, dropout, activation, rate, **block_options) for rate in rates)
        self.norm = nn.LayerNorm(d_model) if cls.norm_first else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None, outputs: int | None = None) -> Tensor:
        """(B, T, D) → (B, T, D), or with ``outputs`` only the first ``outputs`` positions (a classifier
        reading [CLS] alone): the last block then computes just those (:class:`EncoderBlock`)."""
        for layer in self.layers[:-1]:
            x = layer(x, mask)
        x = self.layers[-1](x, mask) if outputs is None else self.layers[-1](x, mask, outputs)
        return self.norm(x)


class Decoder(nn.Module):
    """A stack of decoder blocks; :meth:`new_cache` makes the per-layer caches for incremental decoding."""

    def __init__(self, block: str, layers: int, d_model: int, heads: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        cls = _block_class(block, "decoder")
        self.layers = nn.ModuleList(cls(d_model, heads, d_ff, dropout, activation) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model) if cls.norm_first else nn.Identity()

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


class CausalDecoder(nn.Module):
    """A stack of causal blocks and a final norm of the blocks' kind; a rotary position, when given,
    is shared by every block's attention. :meth:`new_cache` makes the caches for generation."""

    def __init__(self, block: str, layers: int, d_model: int, heads: int, d_ff: int, dropout: float, activation: str,
                 rotary: nn.Module | None = None):
        super().__init__()
        cls = _block_class(block, "causal")
        self.layers = nn.ModuleList(cls(d_model, heads, d_ff, dropout, activation, rotary) for _ in range(layers))
        self.norm = registry.get("norm", cls.norm)(d_model)

    def new_cache(self, length: int = 16) -> list[KVCache]:
        return [KVCache(length) for _ in self.layers]

    def forward(self, x: Tensor, cache: list[KVCache] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache[i])
        return self.norm(x)
