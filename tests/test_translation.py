"""The translation recipe beyond its defaults: positions placed where they act and blocks' parts by
name; a pre-LN model with rotary positions and gated feed-forwards learns, decodes exactly over its
KV cache, and is refused by the Marian export in one line."""

from __future__ import annotations

import pytest
import torch

from conftest import one_error_line, quiet, tfkit, tiny_config
from tfkit import run as runs
from tfkit.decode import beam_search, greedy_search
from tfkit.errors import UsageError
from tfkit.nn.blocks import GatedFeedForward
from tfkit.nn.position import NoPosition, RotaryPosition
from tfkit.recipes.translation import BOS, EOS, PAD, Seq2SeqTransformer
from tfkit.recipes.translation.interop import check_exportable
from tfkit.train import start_training

# pre-LN blocks, rotary positions, SwiGLU feed-forwards: a model the original recipe could not name
MODERN = [
    "model.position=rotary",
    "model.activation=swish",
    "model.encoder.block=pre_ln",
    "model.encoder.feed_forward=glu",
    "model.decoder.block=pre_ln_decoder",
    "model.decoder.feed_forward=glu",
]


def modern_translator(seed: int = 0) -> Seq2SeqTransformer:
    """An untrained MODERN model: arbitrary but fixed outputs."""
    torch.manual_seed(seed)
    encoder = {"block": "pre_ln", "layers": 2, "feed_forward": "glu"}
    decoder = {"block": "pre_ln_decoder", "layers": 2, "feed_forward": "glu"}
    return Seq2SeqTransformer(12, 32, 4, 64, 0.0, "swish", "rotary", encoder, decoder).eval()


def sources() -> torch.Tensor:
    src = torch.randint(4, 12, (5, 7), generator=torch.Generator().manual_seed(1))
    src[1, 4:] = PAD
    src[3, 2:] = PAD
    return src


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory: pytest.TempPathFactory):
    trainer = start_training(
        tiny_config(*MODERN), tmp_path_factory.mktemp("runs") / "modern", torch.device("cpu"), console=quiet()
    )
    trainer.fit(progress=False)
    return trainer.run_dir


def test_rotary_turns_queries_and_keys_and_leaves_the_embeddings_alone():
    model = modern_translator()
    assert isinstance(model.position, NoPosition)
    self_attention = [layer.self_attn for layer in (*model.encoder.layers, *model.decoder.layers)]
    assert all(isinstance(a.rotary, RotaryPosition) for a in self_attention)
    assert all(layer.cross_attn.rotary is None for layer in model.decoder.layers)  # source and target share no positions
    assert all(isinstance(layer.feed_forward, GatedFeedForward) for layer in (*model.encoder.layers, *model.decoder.layers))
    # positions matter: the encoder is not permutation-equivariant, as it would be without any
    src = torch.tensor([[4, 5, 6, 7, 8]])
    memory, _ = model.encode(src)
    flipped, _ = model.encode(src.flip(1))
    assert not torch.allclose(memory.flip(1), flipped, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_rotary_greedy_over_the_cache_equals_decoding_the_whole_prefix(seed):
    """Each cached step's logits are those of re-decoding the whole prefix without a cache, so the
    tokens are too: the cached keys were turned at their own positions, the new query at its offset."""
    model, src = modern_translator(seed), sources()
    got = greedy_search(model, src, BOS, EOS, max_len=9)
    memory, mask = model.encode(src)
    cache = model.decoder.new_cache(9)
    prefixes = torch.full((src.size(0), 1), BOS)
    with torch.no_grad():
        for t in range(9):
            cached = model.decode(prefixes[:, -1:], memory, mask, cache, offset=t)[:, -1]
            full = model.decode(prefixes, memory, mask)[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
            prefixes = torch.cat([prefixes, full.argmax(-1, keepdim=True)], 1)
    for row, hyp in enumerate(got):
        tokens = prefixes[row, 1:].tolist()
        assert hyp == (tokens[: tokens.index(EOS)] if EOS in tokens else tokens)
    assert beam_search(model, src, BOS, EOS, 9, beam=1, length_penalty=0.0) == got


def test_a_pre_ln_rotary_glu_model_learns_to_translate(modern_run):
    records = [r for r in runs.read_metrics(modern_run) if "loss" in r]
    assert records[-1]["loss"] < 0.25 * records[0]["loss"], records  # measured: 5.9 → 0.86-0.88 over seeds 0-2
    recipe, model = runs.open_run(modern_run)
    recipe.prepare(modern_run)
    assert model.encoder.layers[0].self_attn.rotary is not None  # the run reopens as the model it trained
    metrics = recipe.evaluate(model, "test", beam=1)
    assert metrics["exact_match"] > 80 and metrics["bleu"] > 85, metrics  # measured: 98-100 and 98.9-100 over seeds 0-2


def test_the_marian_export_of_a_rotary_model_is_refused_in_one_line(capsys, modern_run, tmp_path):
    code, _, err = tfkit(capsys, "export", str(modern_run), str(tmp_path / "hf"), "--to", "hf")
    assert code != 0
    one_error_line(err, "model.position 'rotary' has no transformers Marian equivalent (MarianMTModel has sinusoidal)")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "key, value, marian",
    [
        ("encoder.feed_forward", "glu", "mlp"),
        ("decoder.norm", "rms_norm", "layer_norm"),
        ("encoder.attention", "relative_multi_head", "multi_head"),
    ],
)
def test_parts_marian_has_not_are_named(key, value, marian):
    model = tiny_config()["model"]
    check_exportable(model)  # null parts are the post-LN blocks' own, Marian's
    stack, part = key.split(".")
    model[stack][part] = marian
    check_exportable(model)
    model[stack][part] = value
    with pytest.raises(
        UsageError, match=rf"^model\.{key} '{value}' has no transformers Marian equivalent \(MarianMTModel has {marian}\)$"
    ):
        check_exportable(model)
