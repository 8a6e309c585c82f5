"""Every registered component against an explicit reference implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tfkit import registry
from tfkit.errors import UsageError
from tfkit.nn import linear as packing
from tfkit.nn import losses
from tfkit.nn.attention import KVCache, MultiHeadAttention, ScaledDotProductAttention, causal_mask
from tfkit.nn.blocks import CausalDecoder, Decoder, Encoder
from tfkit.nn.dropout import Dropout, dropout
from tfkit.nn.position import LearnedPosition, SinusoidalPosition

D, H, B = 32, 4, 3


def padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    """(B, 1, 1, total), True on real tokens."""
    return (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


# -- scaled dot-product attention ---------------------------------------------------------------
def reference_attention(q, k, v, allowed=None):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


@pytest.mark.parametrize("tq,tk", [(5, 5), (1, 7), (3, 8)])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_and_explicit_paths_agree_with_the_formula(tq, tk, use_mask, causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, tq, 8), torch.randn(B, H, tk, 8), torch.randn(B, H, tk, 8)
    mask = padding_mask([tk, tk - 1, 1 if not causal else tk], tk) if use_mask else None
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_mask(tq, tk)
    if mask is not None:
        allowed = allowed & mask
    expected = reference_attention(q, k, v, allowed)
    attention = ScaledDotProductAttention().eval()
    fast = attention(q, k, v, mask=mask, causal=causal)
    attention.explicit = True
    explicit = attention(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)


def test_causal_mask_lets_the_last_query_see_every_key():
    mask = causal_mask(2, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_multi_head_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, H).eval()
    reference = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.in_proj.weight)
        reference.in_proj_bias.copy_(ours.in_proj.bias)
        reference.out_proj.weight.copy_(ours.out_proj.weight)
        reference.out_proj.bias.copy_(ours.out_proj.bias)
    x, memory = torch.randn(B, 6, D), torch.randn(B, 9, D)
    lengths = [9, 4, 7]
    pad = ~padding_mask(lengths, 9)[:, 0, 0]  # torch marks the padding
    expected, _ = reference(x, x, x, attn_mask=~causal_mask(6, 6))
    torch.testing.assert_close(ours(x, causal=True), expected, atol=1e-5, rtol=1e-5)
    expected, _ = reference(x, memory, memory, key_padding_mask=pad)
    torch.testing.assert_close(ours(x, memory, mask=padding_mask(lengths, 9)), expected, atol=1e-5, rtol=1e-5)


def test_multi_head_rejects_indivisible_sizes():
    with pytest.raises(UsageError, match="not divisible"):
        MultiHeadAttention(30, 4)


def test_kv_cache_grows_and_reorders():
    cache = KVCache()
    keys = torch.randn(2, H, 40, 8)
    for t in range(40):  # past the initial capacity of 16, twice
        cache.append(keys[:, :, t : t + 1], -keys[:, :, t : t + 1])
    k, v = cache.keys_values()
    torch.testing.assert_close(k, keys)
    torch.testing.assert_close(v, -keys)
    cache.reorder(torch.tensor([1, 1]))
    torch.testing.assert_close(cache.keys_values()[0], keys[[1, 1]])


def test_kv_cache_reorders_repeatedly_and_keeps_appending():
    cache, keys = KVCache(), torch.randn(3, H, 20, 8)
    expected_k, expected_v = keys[:, :, :0], -keys[:, :, :0]
    for t, order in enumerate([[0, 1, 2], [2, 0, 1], [1, 1, 0], [0, 2, 2]] * 5):  # growth between reorders
        cache.append(keys[:, :, t : t + 1], -keys[:, :, t : t + 1])
        expected_k = torch.cat([expected_k, keys[:, :, t : t + 1]], 2)[order]
        expected_v = torch.cat([expected_v, -keys[:, :, t : t + 1]], 2)[order]
        cache.reorder(torch.tensor(order))
        k, v = cache.keys_values()
        torch.testing.assert_close(k, expected_k)
        torch.testing.assert_close(v, expected_v)


def test_cross_attention_groups_rows_that_share_a_context():
    """Beam search's hypotheses (consecutive rows) attend to their sentence's one copy of the memory."""
    torch.manual_seed(0)
    attention, groups = MultiHeadAttention(D, H).eval(), 4
    x, memory, mask = torch.randn(B * groups, 2, D), torch.randn(B, 8, D), padding_mask([8, 3, 6], 8)
    repeated = attention(x, memory.repeat_interleave(groups, 0), mask=mask.repeat_interleave(groups, 0))
    torch.testing.assert_close(attention(x, memory, mask=mask), repeated, atol=1e-6, rtol=1e-5)
    cache = KVCache()
    steps = [attention(x[:, t : t + 1], memory, mask=mask, cache=cache) for t in range(2)]
    assert cache.keys_values()[0].size(0) == B  # cached once per sentence
    torch.testing.assert_close(torch.cat(steps, 1), repeated, atol=1e-6, rtol=1e-5)


# -- blocks against torch.nn's Transformer layers ----------------------------------------------
def copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    theirs.in_proj_weight.copy_(ours.in_proj.weight)
    theirs.in_proj_bias.copy_(ours.in_proj.bias)
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def copy_common(ours: nn.Module, theirs: nn.Module, norms: int) -> None:
    theirs.linear1.load_state_dict(ours.feed_forward.up.state_dict())
    theirs.linear2.load_state_dict(ours.feed_forward.down.state_dict())
    for i in range(1, norms + 1):
        getattr(theirs, f"norm{i}").load_state_dict(getattr(ours, f"norm{i}").state_dict())


ENCODER_BLOCKS = {"post_ln": False, "pre_ln": True}
DECODER_BLOCKS = {"post_ln_decoder": False, "pre_ln_decoder": True}


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("name", ENCODER_BLOCKS)
def test_encoder_block_matches_torch(name, activation):
    torch.manual_seed(0)
    block = registry.get("block", name)(D, H, 64, 0.0, activation).eval()
    reference = nn.TransformerEncoderLayer(
        D, H, 64, 0.0, activation=activation, batch_first=True, norm_first=ENCODER_BLOCKS[name]
    ).eval()
    with torch.no_grad():
        copy_attention(block.self_attn, reference.self_attn)
        copy_common(block, reference, 2)
    x, lengths = torch.randn(B, 7, D), [7, 3, 5]
    mask = padding_mask(lengths, 7)
    ours = block(x, mask)
    theirs = reference(x, src_key_padding_mask=~mask[:, 0, 0])
    for i, n in enumerate(lengths):  # positions past the padding are don't-cares
        torch.testing.assert_close(ours[i, :n], theirs[i, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODER_BLOCKS)
def test_decoder_block_matches_torch(name):
    torch.manual_seed(0)
    block = registry.get("block", name)(D, H, 64, 0.0, "relu").eval()
    reference = nn.TransformerDecoderLayer(D, H, 64, 0.0, batch_first=True, norm_first=DECODER_BLOCKS[name]).eval()
    with torch.no_grad():
        copy_attention(block.self_attn, reference.self_attn)
        copy_attention(block.cross_attn, reference.multihead_attn)
        copy_common(block, reference, 3)
    x, memory, lengths = torch.randn(B, 6, D), torch.randn(B, 8, D), [8, 2, 5]
    mask = padding_mask(lengths, 8)
    ours = block(x, memory, mask)
    theirs = reference(
        x,
        memory,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(6),
        tgt_is_causal=True,
        memory_key_padding_mask=~mask[:, 0, 0],
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_stacks_refuse_a_block_of_the_other_role():
    with pytest.raises(UsageError, match="does not fit the encoder"):
        Encoder("post_ln_decoder", 1, D, H, 64, 0.0, "relu")
    with pytest.raises(UsageError, match="does not fit the decoder"):
        Decoder("post_ln", 1, D, H, 64, 0.0, "relu")


def test_pre_ln_stack_ends_with_a_layer_norm():
    assert isinstance(Encoder("pre_ln", 2, D, H, 64, 0.0, "relu").norm, nn.LayerNorm)
    assert isinstance(Encoder("post_ln", 2, D, H, 64, 0.0, "relu").norm, nn.Identity)


def test_cached_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    decoder = Decoder("post_ln_decoder", 2, D, H, 64, 0.0, "relu").eval()
    x, memory, lengths = torch.randn(B, 10, D), torch.randn(B, 8, D), [8, 3, 6]
    mask = padding_mask(lengths, 8)
    full = decoder(x, memory, mask)
    cache = decoder.new_cache()
    steps = [decoder(x[:, t : t + 1], memory, mask, cache) for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


# -- positions and activations ------------------------------------------------------------------
def test_sinusoidal_follows_the_paper():
    d, length = 16, 50
    expected = torch.zeros(length, d)
    for pos in range(length):
        for i in range(d // 2):
            expected[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d))
            expected[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d))
    position = SinusoidalPosition(d, max_len=8)  # shorter than the input: the table must regrow
    x = torch.randn(2, length, d)
    torch.testing.assert_close(position(x), x + expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(position(x[:, 3:4], offset=3), x[:, 3:4] + expected[3:4], atol=1e-5, rtol=1e-5)


def test_learned_positions_add_a_trained_row_per_position():
    position = LearnedPosition(D, max_len=12)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(position(x, offset=4), x + position.table[4:9])
    position(x).sum().backward()
    assert position.table.grad[:5].abs().sum() > 0 and position.table.grad[5:].abs().sum() == 0
    with pytest.raises(UsageError, match="longer than the 12 learned"):
        position(torch.randn(1, 13, D))


ACTIVATIONS = {
    "relu": lambda x: x.clamp(min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "swish": lambda x: x * torch.sigmoid(x),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_its_formula(name):
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(registry.get("activation", name)()(x), ACTIVATIONS[name](x))


def test_token_embedding_sums_token_segment_and_position_then_normalises():
    from tfkit.nn.embeddings import TokenEmbedding

    torch.manual_seed(0)
    embed = TokenEmbedding(50, D, 16, 2, 0.0).eval()
    tokens, segments = torch.randint(1, 50, (2, 7)), torch.randint(0, 2, (2, 7))
    summed = embed.tokens.weight[tokens] + embed.segments.weight[segments] + embed.position.table[:7]
    expected = F.layer_norm(summed, (D,), embed.norm.weight, embed.norm.bias)
    torch.testing.assert_close(embed(tokens, segments), expected)


# -- the registry --------------------------------------------------------------------------------
# every entry of every kind, read from the registry itself: a component is tested the moment it is registered
ENTRIES = [(kind, name) for kind in registry.kinds() if kind != "recipe" for name in registry.names(kind)]


def explicit(module: nn.Module) -> nn.Module:
    """``module`` with every attention kernel on its explicit path (softmax(QKᵀ/√d + mask)·V)."""
    for kernel in module.modules():
        if isinstance(kernel, ScaledDotProductAttention):
            kernel.explicit = True
    return module


def finite_gradients(module: nn.Module, *inputs: torch.Tensor) -> None:
    grads = [p.grad for p in module.parameters() if p.requires_grad] + [x.grad for x in inputs if x.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def build(kind: str, name: str, rotary: nn.Module | None = None) -> nn.Module:
    """A tiny instance through the kind's one constructor contract (tfkit.registry's docstring)."""
    cls = registry.get(kind, name)
    return {
        "activation": lambda: cls(),
        "norm": lambda: cls(D),
        "feed_forward": lambda: cls(D, 48, 0.0, "gelu", True),
        "position": lambda: cls(D // H if cls.acts_on == "queries_keys" else D, 16),
        "attention": lambda: cls(D, H, 0.0, True, rotary),
        "block": lambda: cls(D, H, 48, 0.0, "relu", None, rotary),
    }[kind]()


def run_entry(kind: str, module: nn.Module, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The entry's forward on (B, T, D) inputs: self-attention under ``mask`` for what attends
    without causality, causal for causal blocks, cross-attention to ``memory`` for decoder blocks."""
    if kind == "position":
        return module(x if module.acts_on == "embeddings" else x.view(B, x.size(1), H, -1).transpose(1, 2))
    if kind == "attention":
        return module(x, mask=mask)
    if kind == "block":
        return {"encoder": lambda: module(x, mask), "decoder": lambda: module(x, memory, mask), "causal": lambda: module(x)}[
            module.role
        ]()
    return module(x)


@pytest.mark.parametrize("kind, name", ENTRIES)
def test_every_registry_entry_builds_runs_forward_and_backward(kind, name):
    torch.manual_seed(0)
    module = build(kind, name).train()
    x, memory = torch.randn(B, 6, D, requires_grad=True), torch.randn(B, 6, D)
    out = run_entry(kind, module, x, padding_mask([6, 4, 6], 6), memory)
    assert out.shape[0] == B and torch.isfinite(out).all()
    out.square().mean().backward()
    if kind == "position" and name == "none":
        return  # it has nothing to learn and passes its input on
    finite_gradients(module, x)


def masked_and_future_inputs_change_nothing(kind: str, module: nn.Module) -> None:
    """Real positions never see padded keys; with causality no position sees a later one."""
    x, memory = torch.randn(B, 6, D), torch.randn(B, 6, D)
    mask = padding_mask([6, 4, 6], 6)
    causal = kind == "block" and module.role in ("decoder", "causal")
    changed = x.clone()
    if causal:
        changed[:, 4:] += torch.randn(B, 2, D)  # the future of positions 0..3
        keep = (slice(None), slice(0, 4))
    else:
        changed[1, 4:] += torch.randn(2, D)  # padding of row 1
        keep = (1, slice(0, 4))
    before, after = run_entry(kind, module, x, mask, memory), run_entry(kind, module, changed, mask, memory)
    torch.testing.assert_close(after[keep], before[keep], atol=1e-5, rtol=1e-5)


ATTENDING = [(kind, name) for kind, name in ENTRIES if kind in ("attention", "block")]


@pytest.mark.parametrize("kind, name", ATTENDING)
def test_attention_and_blocks_respect_masks_and_their_fused_path_equals_the_explicit_one(kind, name):
    torch.manual_seed(0)
    module = build(kind, name).eval()
    masked_and_future_inputs_change_nothing(kind, module)
    x, memory, mask = torch.randn(B, 6, D), torch.randn(B, 6, D), padding_mask([6, 4, 6], 6)
    fused = run_entry(kind, module, x, mask, memory)
    slow = run_entry(kind, explicit(module), x, mask, memory)
    real = mask[:, 0, 0, :, None] if kind == "attention" or module.role == "encoder" else torch.ones(B, 6, 1, dtype=torch.bool)
    torch.testing.assert_close(fused * real, slow * real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, name", ATTENDING)
def test_a_rotary_position_composes_with_every_attention_and_block_or_is_refused_in_one_line(kind, name):
    rotary = build("position", "rotary")
    try:
        module = build(kind, name, rotary).eval()
    except UsageError as e:
        assert "\n" not in str(e) and "rotary" in str(e)
        return
    masked_and_future_inputs_change_nothing(kind, module)
    x = torch.randn(B, 6, D)
    plain = build(kind, name).eval()
    plain.load_state_dict(module.state_dict())
    assert not torch.allclose(run_entry(kind, module, x, None, x), run_entry(kind, plain, x, None, x))  # it acts


PARTS = [
    (block, part, name) for block in registry.names("block") for part in ("feed_forward", "norm") for name in registry.names(part)
]


@pytest.mark.parametrize("block, part, name", PARTS)
def test_blocks_take_their_parts_by_registry_name(block, part, name):
    stack_cls = {"encoder": Encoder, "decoder": Decoder, "causal": CausalDecoder}[registry.get("block", block).role]
    stack = stack_cls(block, 2, D, H, 48, 0.0, "swish", **{part: name})
    wanted = registry.get(part, name)
    assert sum(type(m) is wanted for m in stack.modules()) >= 2 * (1 if part == "feed_forward" else 2)
    x = torch.randn(B, 5, D)
    out = stack(x) if stack_cls is CausalDecoder else stack(x, x) if stack_cls is Decoder else stack(x)
    assert torch.isfinite(out).all()


def test_an_attention_layer_is_refused_where_it_cannot_attend():
    with pytest.raises(
        UsageError, match="attention 'relative_multi_head' cannot be causal-attention .*valid for causal: multi_head"
    ):
        CausalDecoder("gpt", 1, D, H, 48, 0.0, "gelu", attention="relative_multi_head")
    with pytest.raises(UsageError, match="cannot be causal-attention"):
        Decoder("post_ln_decoder", 1, D, H, 48, 0.0, "relu", attention="relative_multi_head")


def test_rms_norm_and_layer_norm_match_their_formulas():
    x = torch.randn(3, 5, D) * 3 + 1
    rms = registry.get("norm", "rms_norm")(D)
    torch.testing.assert_close(rms(x), x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt())
    layer = registry.get("norm", "layer_norm")(D)
    torch.testing.assert_close(
        layer(x), (x - x.mean(-1, keepdim=True)) / x.var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    )


@pytest.mark.parametrize("activation", ["swish", "gelu"])
def test_gated_and_plain_feed_forwards_match_their_formulas(activation):
    torch.manual_seed(0)
    x, act = torch.randn(2, 3, D), ACTIVATIONS[activation]
    glu = registry.get("feed_forward", "glu")(D, 24, 0.0, activation, bias=False)
    gate, up = glu.gate_up.weight.chunk(2)
    torch.testing.assert_close(glu(x), (act(x @ gate.T) * (x @ up.T)) @ glu.down.weight.T, rtol=1e-5, atol=1e-5)
    mlp = registry.get("feed_forward", "mlp")(D, 24, 0.0, activation)
    expected = act(x @ mlp.up.weight.T + mlp.up.bias) @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_component_lists_the_valid_names():
    with pytest.raises(UsageError, match="valid: .*post_ln"):
        registry.get("block", "postln")
    with pytest.raises(UsageError, match="unknown component kind 'nonsense' \\(valid: activation, attention"):
        registry.get("nonsense", "x")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(monkeypatch, smoothing):
    monkeypatch.setattr(losses, "CHUNK", 64)  # several chunks and a short last one
    torch.manual_seed(0)
    hidden, weight = torch.randn(150, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(1, 40, (150,))
    targets[::7] = 0  # ignored
    expected = F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=0, label_smoothing=smoothing, reduction="sum")
    expected_grads = torch.autograd.grad(3 * expected, (hidden, weight))
    total = losses.linear_cross_entropy(hidden, weight, targets, 0, smoothing)
    grads = torch.autograd.grad(3 * total, (hidden, weight))
    torch.testing.assert_close(total, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    with torch.no_grad():
        torch.testing.assert_close(losses.linear_cross_entropy(hidden, weight, targets, 0, smoothing), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax and sums
        low = losses.linear_cross_entropy(hidden, weight, targets, 0, smoothing)
    assert low.dtype == torch.float32 and abs(low.item() - expected.item()) < 0.02 * expected.item()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_at_rate_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000, requires_grad=True) + 1
    out = Dropout(p)(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.002
    scale = out[kept] / x[kept]
    torch.testing.assert_close(scale, torch.full_like(scale, scale[0].item()))  # one scale for all kept
    assert abs(scale[0].item() * (1 - p) - 1) < 1e-4  # 1 / (1 - p), up to p's rounding to 1/65536
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, kept * scale[0])  # backward drops the same elements
    assert Dropout(p)(torch.ones(3, 7)).shape == (3, 7)  # 64-bit draws fill four elements each: 21 is not a multiple
    torch.manual_seed(1)
    first = Dropout(p)(x)
    torch.manual_seed(1)
    assert torch.equal(first, Dropout(p)(x))  # the global generator: a checkpoint's RNG state replays it
    assert torch.equal(Dropout(p).eval()(x), x) and torch.equal(Dropout(0.0)(x), x)


def test_attention_dropout_on_the_cpu_takes_the_explicit_path():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    attend = ScaledDotProductAttention(dropout=0.3).train()
    torch.manual_seed(1)
    out = attend(q, k, v)
    torch.manual_seed(1)
    weights = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1)
    torch.testing.assert_close(out, dropout(weights, 0.3) @ v)


# -- linear layers on packed weights ------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, nn.ReLU(), nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Tanh()])
@pytest.mark.parametrize("rows", [None, slice(0, 5), slice(5, None)])
def test_packed_linear_equals_f_linear(monkeypatch, activation, rows):
    monkeypatch.setattr(packing, "PACK_ABOVE", 0)  # these small weights would not be packed otherwise
    torch.manual_seed(0)
    weight, bias, x = torch.randn(12, 16), torch.randn(12), torch.randn(3, 4, 16)
    expected = F.linear(x, weight[rows or slice(None)], bias[rows or slice(None)])
    expected = expected if activation is None else activation(expected)
    with torch.no_grad(), packing.packed_weights():
        got = packing.linear(x, weight, bias, rows, activation)
        packed = len(packing._packs) if packing._packing_available() else None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if packed is not None:  # oneDNN fuses these activations; others are applied after F.linear
        assert packed == (0 if isinstance(activation, nn.Tanh) else 1)


def test_packed_weights_last_for_one_block_and_leave_autograd_alone(monkeypatch):
    monkeypatch.setattr(packing, "PACK_ABOVE", 0)
    torch.manual_seed(0)
    layer, x = packing.Linear(16, 8), torch.randn(5, 16)
    with torch.no_grad(), packing.packed_weights():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # between blocks the weights may change (a training step)
    with packing.packed_weights():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer(x).sum().backward()  # with gradients: plain F.linear
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(8, 16))
    assert packing._packs is None


def test_small_weights_and_one_row_products_are_not_packed():
    with torch.no_grad(), packing.packed_weights():
        packing.linear(torch.randn(2, 16), torch.randn(8, 16))
        packing.linear(torch.randn(1, 1, 512), torch.randn(512, 512))  # one sequence's decoding step
        assert packing._packs == {} or not packing._packing_available()
