"""The benchmark's rows: each builds a tfkit model and its peer at matched sizes (SIZES), with the same
inputs, and counts the training FLOPs of one call. Rows run in the order they are registered."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from harness import SETUP, Row, decoding_side, on_device, train_flops, training_side
from torch import Tensor, nn

ROWS: dict[str, Callable[[], Row]] = {}


def row(name: str):
    """Register a function that builds a row; rows run in the order they are registered."""

    def add(build: Callable[[], Row]) -> Callable[[], Row]:
        ROWS[name] = build
        return build

    return add


# small: the CPU targets' sizes. base: the papers' base models (Transformer-base, ViT-B/16, BERT-base,
# Conformer-M with an odd kernel, as depthwise "same" padding needs), for accelerators.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "seq2seq": dict(vocab=8000, d_model=256, heads=4, d_ff=1024, layers=3, dropout=0.1, length=32, batch=64, decode_batch=32),
        "vit": dict(image=32, patch=4, d_model=192, depth=6, heads=3, d_ff=768, classes=10, batch=64),
        "conformer": dict(mels=80, frames=400, d_model=144, layers=4, heads=4, d_ff=576, kernel=31, batch=8, vocab=32),
        "bert": dict(vocab=8000, d_model=256, heads=4, d_ff=1024, layers=4, dropout=0.1, length=128, batch=16),
        "gpt": dict(vocab=8000, d_model=256, heads=4, d_ff=1024, layers=4, length=128, batch=16, new_tokens=128),
    },
    "base": {
        "seq2seq": dict(
            vocab=32000, d_model=512, heads=8, d_ff=2048, layers=6, dropout=0.1, length=64, batch=128, decode_batch=64
        ),
        "vit": dict(image=224, patch=16, d_model=768, depth=12, heads=12, d_ff=3072, classes=1000, batch=128),
        "conformer": dict(mels=80, frames=1600, d_model=256, layers=16, heads=4, d_ff=1024, kernel=31, batch=32, vocab=256),
        "bert": dict(vocab=30522, d_model=768, heads=12, d_ff=3072, layers=12, dropout=0.1, length=512, batch=32),
        "gpt": dict(vocab=50257, d_model=768, heads=12, d_ff=3072, layers=12, length=1024, batch=8, new_tokens=256),
    },
}


def config(model: str) -> dict[str, Any]:
    return SIZES[SETUP.size][model]


class TorchSeq2Seq(nn.Module):
    """The peer: nn.Transformer with tfkit's surroundings (one tied embedding, sinusoids, √d scaling)."""

    def __init__(self, vocab: int, d_model: int, heads: int, d_ff: int, layers: int, dropout: float, **_):
        super().__init__()
        from tfkit.nn.position import sinusoids

        self.embed = nn.Embedding(vocab, d_model, padding_idx=0)
        self.register_buffer("table", sinusoids(1024, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.transformer = nn.Transformer(
            d_model, heads, layers, layers, d_ff, dropout, "relu", batch_first=True, norm_first=False
        )
        # nn.Transformer ends both stacks with a LayerNorm even when post-LN; tfkit (and Vaswani) do not
        self.transformer.encoder.norm = self.transformer.decoder.norm = None
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)

    def _embed(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.embed.embedding_dim)
        return self.dropout(x + self.table[: tokens.size(1)])

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1), device=tgt.device)
        pad = src == 0
        hidden = self.transformer(
            self._embed(src),
            self._embed(tgt),
            tgt_mask=causal,
            tgt_is_causal=True,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
        )
        return F.linear(hidden, self.embed.weight)


def tfkit_seq2seq() -> nn.Module:
    from tfkit.recipes.translation import Seq2SeqTransformer

    c = config("seq2seq")
    return Seq2SeqTransformer(
        c["vocab"],
        c["d_model"],
        c["heads"],
        c["d_ff"],
        c["dropout"],
        "relu",
        "sinusoidal",
        {"block": "post_ln", "layers": c["layers"]},
        {"block": "post_ln_decoder", "layers": c["layers"]},
    )


def marian() -> nn.Module:
    from transformers import MarianConfig, MarianMTModel

    c = config("seq2seq")
    marian_config = MarianConfig(
        vocab_size=c["vocab"],
        decoder_vocab_size=c["vocab"],
        d_model=c["d_model"],
        encoder_layers=c["layers"],
        decoder_layers=c["layers"],
        encoder_attention_heads=c["heads"],
        decoder_attention_heads=c["heads"],
        encoder_ffn_dim=c["d_ff"],
        decoder_ffn_dim=c["d_ff"],
        activation_function="relu",
        dropout=c["dropout"],
        max_position_embeddings=1024,
        pad_token_id=0,
        decoder_start_token_id=2,
        eos_token_id=3,
        forced_eos_token_id=None,  # its default forces EOS as the last token, work tfkit does not do
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(marian_config)


def random_ids(batch: int, length: int) -> Tensor:
    return torch.randint(4, config("seq2seq")["vocab"], (batch, length))  # ids 0..3 are special: no padding, no EOS


@row("Seq2seq training step")
def seq2seq_training() -> Row:
    c = config("seq2seq")
    batch, n = c["batch"], c["length"]
    src, tgt = on_device(random_ids(batch, n), random_ids(batch, n + 1))
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]

    def loss(model: nn.Module) -> Tensor:
        logits = model(src, tgt_in)
        return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=0, label_smoothing=0.1)

    def ours_loss(model: nn.Module) -> Tensor:  # as the recipe trains: the output layer fused with its loss
        return model(src, tgt_in, tgt_out, 0.1) / (tgt_out != 0).sum()

    torch.manual_seed(0)
    ours = training_side("tfkit", tfkit_seq2seq(), ours_loss)
    torch.manual_seed(0)
    peer = training_side("torch.nn.Transformer", TorchSeq2Seq(**c), loss)
    d, f, layers = c["d_model"], c["d_ff"], c["layers"]
    matmuls = [
        (layers * (4 * d * d + 2 * d * f), n),  # encoder: self-attention, feed-forward
        (layers * (6 * d * d + 2 * d * f), n),  # decoder: self-attention, cross Q and output, feed-forward
        (layers * 2 * d * d, n),  # cross-attention K and V project the source
        (d * c["vocab"], n),  # output layer
    ]
    attention = [(layers, n, n), (layers, n, n), (layers, n, n)]  # encoder self, decoder self, cross
    return Row("Seq2seq training step", ours, peer, flops=train_flops(batch, d, matmuls, attention))


@row("ViT training step")
def vit_training() -> Row:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from tfkit.recipes.vit import VisionTransformer

    c = config("vit")
    batch, size, patch, d, depth, heads, f, classes = (
        c[k] for k in ("batch", "image", "patch", "d_model", "depth", "heads", "d_ff", "classes")
    )
    images, labels = on_device(torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,)))

    def loss(model: nn.Module) -> Tensor:
        return F.cross_entropy(model(images), labels)

    torch.manual_seed(0)
    ours = training_side(
        "tfkit", VisionTransformer(size, 3, classes, patch, d, depth, heads, f, 0.0, 0.0, "gelu", "pre_ln", 1e-6), loss
    )
    torch.manual_seed(0)
    timm = TimmViT(
        img_size=size, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=f / d, num_classes=classes
    )
    peer = training_side("timm", timm, loss)
    patches = (size // patch) ** 2
    matmuls = [(3 * patch * patch * d, patches), (depth * (4 * d * d + 2 * d * f), patches + 1), (d * classes, 1)]
    return Row("ViT training step", ours, peer, flops=train_flops(batch, d, matmuls, [(depth, patches + 1, patches + 1)]))


class TorchaudioConformerCTC(nn.Module):
    """The peer: torchaudio's Conformer (absolute-position-free attention, plain batch norm) between
    the same subsampling and CTC head as tfkit's."""

    def __init__(self, mels: int, vocab: int, d_model: int, heads: int, d_ff: int, layers: int, kernel: int, **_):
        super().__init__()
        from torchaudio.models import Conformer

        from tfkit.nn.conformer import ConvolutionSubsampling

        self.subsampling = ConvolutionSubsampling(mels, d_model, d_model, 0.1)
        self.encoder = Conformer(d_model, heads, d_ff, layers, kernel, dropout=0.1)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(features, lengths)
        x, lengths = self.encoder(x, lengths)
        return self.head(x).log_softmax(-1), lengths


@row("Conformer training step (CTC)")
def conformer_training() -> Row:
    from tfkit.recipes.conformer.model import ConformerCTC

    c = config("conformer")
    batch, d, f = c["batch"], c["d_model"], c["d_ff"]
    lengths = torch.linspace(c["frames"], 0.75 * c["frames"], batch).long()  # padding exercises the masks
    labels = c["frames"] // 10  # per utterance, as the CPU size's 40 in 400 frames; CTC needs <= 1 per output frame (4 frames)
    features, lengths, targets, target_lengths = on_device(
        torch.randn(batch, c["frames"], c["mels"]),
        lengths,
        torch.randint(1, c["vocab"], (batch * labels,)),
        torch.full((batch,), labels),
    )

    def loss(model: nn.Module) -> Tensor:
        log_probs, out_lengths = model(features, lengths)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths, zero_infinity=True)

    torch.manual_seed(0)
    ours = ConformerCTC(
        c["mels"], c["vocab"], d, d, c["heads"], f, c["layers"], c["kernel"], 0.1, 0.0, "swish", "relative_multi_head"
    )
    torch.manual_seed(0)
    peer = TorchaudioConformerCTC(**c)
    t1, f1 = (c["frames"] - 1) // 2, (c["mels"] - 1) // 2
    n, f2 = (t1 - 1) // 2, (f1 - 1) // 2
    block = 2 * 2 * d * f + 4 * d * d + 3 * d * d  # two feed-forwards, attention, the conv module's pointwise convs
    matmuls = [
        (9 * d, t1 * f1),
        (9 * d * d, n * f2),
        (f2 * d * d, n),  # subsampling convolutions and projection
        (c["layers"] * block, n),
        (c["layers"] * c["kernel"] * d, n),  # blocks, depthwise convolutions
        (d * c["vocab"], n),  # CTC head
    ]
    return Row(
        "Conformer training step (CTC)",
        training_side("tfkit", ours, loss),
        training_side("torchaudio", peer, loss),
        flops=train_flops(batch, d, matmuls, [(c["layers"], n, n)]),
    )


def bert_batch(batch: int, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[CLS] A [SEP] B [SEP] with random ordinary tokens, no padding; 15% chosen by tfkit's mask_tokens.
    Returns masked ids, segment ids, flat chosen positions, their labels, (B, T) labels with -100
    elsewhere (transformers' convention), NSP labels."""
    from tfkit.recipes.bert.data import CLS, SEP, SPECIALS
    from tfkit.recipes.bert.pretrain import mask_tokens

    vocab = config("bert")["vocab"]
    ids = torch.randint(len(SPECIALS), vocab, (batch, length))
    middle = length // 2 - 1
    ids[:, 0], ids[:, middle], ids[:, -1] = CLS, SEP, SEP
    segments = (torch.arange(length) > middle).long().expand(batch, length).contiguous()
    masked, positions, labels = mask_tokens(ids, vocab, torch.Generator().manual_seed(0))
    full = torch.full((batch * length,), -100, dtype=torch.long)
    full[positions] = labels
    return on_device(masked, segments, positions, labels, full.view(batch, length), torch.randint(0, 2, (batch,)))


@row("BERT pretraining step (MLM+NSP)")
def bert_pretraining() -> Row:
    from transformers import BertConfig, BertForPreTraining

    from tfkit.recipes.bert.model import Bert, BertForPretraining

    c = config("bert")
    batch, n, d, f, layers, vocab = c["batch"], c["length"], c["d_model"], c["d_ff"], c["layers"], c["vocab"]
    masked, segments, positions, labels, full_labels, nsp_labels = bert_batch(batch, n)
    ones = torch.ones_like(masked)

    def ours_loss(model: nn.Module) -> Tensor:
        mlm, nsp = model(masked, segments, positions)  # MLM logits at the chosen positions only
        return F.cross_entropy(mlm, labels) + F.cross_entropy(nsp, nsp_labels)

    def peer_loss(model: nn.Module) -> Tensor:  # MLM logits at every position, -100 labels ignored
        return model(
            input_ids=masked, token_type_ids=segments, attention_mask=ones, labels=full_labels, next_sentence_label=nsp_labels
        ).loss

    torch.manual_seed(0)
    bert = Bert(vocab, d, c["heads"], f, layers, c["dropout"], "gelu", "post_ln", n, 1e-12)
    ours = training_side("tfkit", BertForPretraining(bert, 1e-12), ours_loss)
    torch.manual_seed(0)
    bert_config = BertConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=c["heads"],
        intermediate_size=f,
        hidden_act="gelu",
        hidden_dropout_prob=c["dropout"],
        attention_probs_dropout_prob=c["dropout"],
        max_position_embeddings=n,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    peer = training_side("BertForPreTraining", BertForPreTraining(bert_config), peer_loss)
    chosen = len(positions) / batch  # per sample; both sides are credited with MLM logits here only
    matmuls = [
        (layers * (4 * d * d + 2 * d * f), n),  # encoder: attention projections, feed-forward
        (d * d + 2 * d, 1),  # pooler and NSP classifier on [CLS]
        (d * d + vocab * d, chosen),  # MLM transform and output layer at the chosen positions
    ]
    return Row("BERT pretraining step (MLM+NSP)", ours, peer, flops=train_flops(batch, d, matmuls, [(layers, n, n)]))


def gpt_pair() -> tuple[nn.Module, nn.Module]:
    """tfkit's CausalLM (the recipe's gpt block, dropout 0 as it trains) and transformers' GPT2LMHeadModel
    (sdpa) of the same sizes, both from seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tfkit.recipes.causal_lm import CausalLM

    c = config("gpt")
    positions = max(c["length"], c["new_tokens"] + 1)
    torch.manual_seed(0)
    ours = CausalLM(c["vocab"], c["d_model"], c["heads"], c["d_ff"], c["layers"], 0.0, "gelu_tanh", "gpt", "learned", positions)
    torch.manual_seed(0)
    gpt2 = GPT2Config(
        vocab_size=c["vocab"],
        n_positions=positions,
        n_embd=c["d_model"],
        n_layer=c["layers"],
        n_head=c["heads"],
        n_inner=c["d_ff"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return ours, GPT2LMHeadModel(gpt2)


@row("GPT training step")
def gpt_training() -> Row:
    c = config("gpt")
    batch, n, d, f, layers = c["batch"], c["length"], c["d_model"], c["d_ff"], c["layers"]
    (ids,) = on_device(torch.randint(1, c["vocab"], (batch, n + 1)))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def ours_loss(model: nn.Module) -> Tensor:  # as the recipe trains: the tied output layer fused with its loss
        return model(inputs, targets=targets) / targets.numel()

    def peer_loss(model: nn.Module) -> Tensor:  # the same n predictions (its labels= would shift to n - 1)
        return F.cross_entropy(model(input_ids=inputs).logits.flatten(0, 1), targets.flatten())

    ours, peer = gpt_pair()
    matmuls = [(layers * (4 * d * d + 2 * d * f), n), (d * c["vocab"], n)]  # blocks; the tied output layer
    return Row(
        "GPT training step",
        training_side("tfkit", ours, ours_loss),
        training_side("GPT2LMHeadModel", peer, peer_loss),
        flops=train_flops(batch, d, matmuls, [(layers, n, n)]),
    )


def gpt_generation_row(name: str, prompt_length: int, new_tokens: int) -> Row:
    """One sequence, as ``tfkit predict`` generates: greedy, with the KV cache, an end-of-text id the
    model never picks (tfkit) or ``min_new_tokens`` (transformers), so both make exactly ``new_tokens``."""
    from tfkit.recipes.causal_lm import generate

    (prompt,) = on_device(torch.randint(1, config("gpt")["vocab"], (1, prompt_length)))
    ours_model, peer_model = gpt_pair()

    # unpacked: tfkit.nn.linear packs no one-row product, and tfkit predict packs once for all prompts,
    # which leaves a prompt's prefill as fast as on the stored weights
    def ours() -> None:
        out = generate(ours_model, prompt[0].tolist(), new_tokens, 0.0, 1, 1.0, torch.Generator(), -1)
        assert len(out) == new_tokens

    def peer() -> None:
        out = peer_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape == (1, prompt_length + new_tokens)

    tokens = prompt_length if new_tokens == 1 else new_tokens
    return Row(name, decoding_side("tfkit", ours_model, ours), decoding_side("GPT2LMHeadModel", peer_model, peer), tokens=tokens)


@row("GPT generation: prefill")
def gpt_prefill() -> Row:
    return gpt_generation_row("GPT generation: prefill", config("gpt")["length"], 1)  # the prompt, then the first token


@row("GPT generation: decode")
def gpt_decode() -> Row:
    return gpt_generation_row("GPT generation: decode", 1, config("gpt")["new_tokens"])  # a one-token prompt: all decode steps


def decoding_row(name: str, beam: int) -> Row:
    from tfkit.decode import beam_search, greedy_search

    c = config("seq2seq")
    batch, n = c["decode_batch"], c["length"]
    (src,) = on_device(random_ids(batch, n))
    mask = torch.ones_like(src)
    torch.manual_seed(0)
    ours_model = tfkit_seq2seq()
    torch.manual_seed(0)
    peer_model = marian()

    # an EOS id no model can emit, so an untrained model's output is never cut short
    def ours() -> None:
        if beam == 1:
            out = greedy_search(ours_model, src, 2, -1, n)
        else:
            out = beam_search(ours_model, src, 2, -1, n, beam, 1.0)
        assert all(len(hyp) == n for hyp in out)

    def peer() -> None:
        out = peer_model.generate(
            input_ids=src, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, num_beams=beam, do_sample=False
        )
        assert out.shape == (batch, 1 + n)  # decoder_start_token_id, then n new tokens

    return Row(name, decoding_side("tfkit", ours_model, ours), decoding_side("MarianMTModel", peer_model, peer), tokens=batch * n)


@row("Greedy decoding")
def greedy() -> Row:
    return decoding_row("Greedy decoding", beam=1)


@row("Beam search 4")
def beam4() -> Row:
    return decoding_row("Beam search 4", beam=4)
