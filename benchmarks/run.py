"""tfkit against peer implementations of the same models: same sizes, inputs, threads and optimiser.

    python benchmarks/run.py [--quick] [--json out.json] [--threads N] [--only TEXT] [--compile]
                             [--device cuda] [--precision bf16] [--size base] [--peak-tflops T]

Each row builds a tfkit model and its peer in this process from the same seed, warms both up, then
alternates them call by call (swapping who goes first) so that drift and the other processes on the
machine slow both alike, and reports medians. ratio = tfkit speed / peer speed: peer time over tfkit
time for training, tfkit tokens/s over peer tokens/s for decoding; > 1 means tfkit is faster.

Peak memory is the largest total of live tensor bytes during one call: the bytes resident between
calls (parameters, buffers, optimiser state) plus the peak of allocations minus frees during the
last warm-up call, which torch.profiler(profile_memory=True) records on the CPU and the caching
allocator's statistics give on a GPU. It counts tensors only, not the Python heap or allocator
slack, so it does not depend on what glibc or the CUDA allocator keeps cached.

--precision bf16 runs both sides' forward passes and losses under torch.autocast; --size base uses
the papers' base models (SIZES). Model FLOP utilisation (training rows) = training FLOPs per step /
step time / peak FLOP/s, where the peak is --peak-tflops if given, else on a GPU in bf16 the card's
dense bf16 peak from its data sheet (BF16_PEAK_TFLOPS) where the card is known, else the measured
median of an n×n @ n×n product in the benchmark's dtype (2·n³ FLOPs; n = 2048 on the CPU, 8192 on a
GPU), and

    training FLOPs = 6 · Σ (weights of a matmul × tokens it multiplies)
                   + 12 · d_model · Σ over attention modules (queries × keys)     (per sample, × batch)

6 = 2 FLOPs per multiply-add × 3 (the forward pass and the two matmuls of its backward). Counted
weights: attention projections, feed-forward layers, the output layer / classifier, the ViT patch
projection, the Conformer's convolutions (each kernel weight × the output positions it makes); not embeddings looked up by index, biases, LayerNorms, softmax or the optimiser.
Cross-attention's key and value projections multiply source tokens. The attention term counts QKᵀ and
the weighted sum of V over the full queries × keys grid, causal or not. Both sides of a row share the
same formula, so their MFU differ exactly as their speeds do; tfkit's relative-position projection,
which the peer lacks, is not counted. BERT's MLM transform and output layer
count only the positions chosen for prediction (15%), the useful work, for both sides: tfkit computes
them there only, transformers' BertForPreTraining at every position and ignores the rest (-100 labels),
so the peer's extra work shows as lower MFU rather than more FLOPs. Likewise tfkit's ViT runs its
last block for [CLS] alone (the only position its head reads) and timm's for every patch; both are
credited with the full last block.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


@dataclass
class Side:
    """One implementation of a row: ``call`` does one timed unit of work (a training step, a decode)."""

    name: str
    call: Callable[[], Any]
    resident: Callable[[], int]  # tensor bytes that live between calls, once warmed up


@dataclass
class Row:
    name: str
    ours: Side
    peer: Side
    tokens: int | None = None  # tokens generated per call: the row is reported in tokens/s
    flops: float | None = None  # training FLOPs per call, for MFU


ROWS: dict[str, Callable[[], Row]] = {}


def row(name: str):
    """Register a function that builds a row; rows run in the order they are registered."""

    def add(build: Callable[[], Row]) -> Callable[[], Row]:
        ROWS[name] = build
        return build

    return add


# -- helpers shared by rows --------------------------------------------------------------------------
def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # tied weights once
    return sum(unique.values())


@dataclass
class Setup:
    """What the command line chose, for every row."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None  # autocast dtype of both sides; None: fp32
    size: str = "small"  # a key of SIZES
    compile: bool = False  # both sides of every training row through torch.compile


SETUP = Setup()


def autocast():
    return torch.autocast(SETUP.device.type, dtype=SETUP.dtype, enabled=SETUP.dtype is not None)


def synchronize() -> None:
    if SETUP.device.type == "cuda":
        torch.cuda.synchronize()


def on_device(*tensors: Tensor) -> list[Tensor]:
    """Inputs are drawn on the CPU, then moved: the same inputs whatever the device."""
    return [t.to(SETUP.device) for t in tensors]


def training_side(name: str, model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> Side:
    model.to(SETUP.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=SETUP.device.type == "cuda")
    forward = torch.compile(model) if SETUP.compile else model

    def step() -> None:
        with autocast():
            value = loss(forward)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Side(name, step, lambda: resident_bytes(model, optimizer))  # AdamW's state appears at step 1


def decoding_side(name: str, model: nn.Module, decode: Callable[[], Any]) -> Side:
    model.to(SETUP.device).eval()

    def call() -> Any:
        with torch.inference_mode(), autocast():
            return decode()

    return Side(name, call, lambda: resident_bytes(model))


def train_flops(batch: int, d_model: int, matmuls: list[tuple[int, int]], attention: list[tuple[int, int, int]]) -> float:
    """matmuls: (weights, tokens per sample); attention: (modules, queries, keys) per sample."""
    return batch * (6 * sum(w * n for w, n in matmuls) + 12 * d_model * sum(m * q * k for m, q, k in attention))


# -- rows -----------------------------------------------------------------------------------------
# small: the CPU targets' sizes. base: the papers' base models (Transformer-base, ViT-B/16, BERT-base,
# Conformer-M with an odd kernel, as depthwise "same" padding needs), for accelerators.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "seq2seq": dict(vocab=8000, d_model=256, heads=4, d_ff=1024, layers=3, dropout=0.1, length=32, batch=64, decode_batch=32),
        "vit": dict(image=32, patch=4, d_model=192, depth=6, heads=3, d_ff=768, classes=10, batch=64),
        "conformer": dict(mels=80, frames=400, d_model=144, layers=4, heads=4, d_ff=576, kernel=31, batch=8, vocab=32),
        "bert": dict(vocab=8000, d_model=256, heads=4, d_ff=1024, layers=4, dropout=0.1, length=128, batch=16),
    },
    "base": {
        "seq2seq": dict(vocab=32000, d_model=512, heads=8, d_ff=2048, layers=6, dropout=0.1, length=64, batch=128, decode_batch=64),
        "vit": dict(image=224, patch=16, d_model=768, depth=12, heads=12, d_ff=3072, classes=1000, batch=128),
        "conformer": dict(mels=80, frames=1600, d_model=256, layers=16, heads=4, d_ff=1024, kernel=31, batch=32, vocab=256),
        "bert": dict(vocab=30522, d_model=768, heads=12, d_ff=3072, layers=12, dropout=0.1, length=512, batch=32),
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
            self._embed(src), self._embed(tgt), tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=pad, memory_key_padding_mask=pad,
        )
        return F.linear(hidden, self.embed.weight)


def tfkit_seq2seq() -> nn.Module:
    from tfkit.recipes.translation import Seq2SeqTransformer

    c = config("seq2seq")
    return Seq2SeqTransformer(
        c["vocab"], c["d_model"], c["heads"], c["d_ff"], c["dropout"], "relu", "sinusoidal",
        {"block": "post_ln", "layers": c["layers"]}, {"block": "post_ln_decoder", "layers": c["layers"]},
    )


def marian() -> nn.Module:
    from transformers import MarianConfig, MarianMTModel

    c = config("seq2seq")
    marian_config = MarianConfig(
        vocab_size=c["vocab"], decoder_vocab_size=c["vocab"], d_model=c["d_model"],
        encoder_layers=c["layers"], decoder_layers=c["layers"],
        encoder_attention_heads=c["heads"], decoder_attention_heads=c["heads"],
        encoder_ffn_dim=c["d_ff"], decoder_ffn_dim=c["d_ff"], activation_function="relu", dropout=c["dropout"],
        max_position_embeddings=1024, pad_token_id=0, decoder_start_token_id=2, eos_token_id=3,
        forced_eos_token_id=None,  # its default forces EOS as the last token, work tfkit does not do
        scale_embedding=True, share_encoder_decoder_embeddings=True,
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
    batch, size, patch, d, depth, heads, f, classes = (c[k] for k in ("batch", "image", "patch", "d_model", "depth", "heads", "d_ff", "classes"))
    images, labels = on_device(torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,)))

    def loss(model: nn.Module) -> Tensor:
        return F.cross_entropy(model(images), labels)

    torch.manual_seed(0)
    ours = training_side("tfkit", VisionTransformer(size, 3, classes, patch, d, depth, heads, f, 0.0, 0.0, "gelu", "pre_ln", 1e-6), loss)
    torch.manual_seed(0)
    timm = TimmViT(img_size=size, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=f / d, num_classes=classes)
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
    from tfkit.recipes.conformer import ConformerCTC

    c = config("conformer")
    batch, d, f = c["batch"], c["d_model"], c["d_ff"]
    lengths = torch.linspace(c["frames"], 0.75 * c["frames"], batch).long()  # padding exercises the masks
    labels = c["frames"] // 10  # per utterance, as the CPU size's 40 in 400 frames; CTC needs <= 1 per output frame (4 frames)
    features, lengths, targets, target_lengths = on_device(
        torch.randn(batch, c["frames"], c["mels"]), lengths, torch.randint(1, c["vocab"], (batch * labels,)), torch.full((batch,), labels)
    )

    def loss(model: nn.Module) -> Tensor:
        log_probs, out_lengths = model(features, lengths)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths, zero_infinity=True)

    torch.manual_seed(0)
    ours = ConformerCTC(c["mels"], c["vocab"], d, d, c["heads"], f, c["layers"], c["kernel"], 0.1, 0.0, "swish", "relative_multi_head")
    torch.manual_seed(0)
    peer = TorchaudioConformerCTC(**c)
    t1, f1 = (c["frames"] - 1) // 2, (c["mels"] - 1) // 2
    n, f2 = (t1 - 1) // 2, (f1 - 1) // 2
    block = 2 * 2 * d * f + 4 * d * d + 3 * d * d  # two feed-forwards, attention, the conv module's pointwise convs
    matmuls = [
        (9 * d, t1 * f1), (9 * d * d, n * f2), (f2 * d * d, n),  # subsampling convolutions and projection
        (c["layers"] * block, n), (c["layers"] * c["kernel"] * d, n),  # blocks, depthwise convolutions
        (d * c["vocab"], n),  # CTC head
    ]
    return Row("Conformer training step (CTC)", training_side("tfkit", ours, loss), training_side("torchaudio", peer, loss),
               flops=train_flops(batch, d, matmuls, [(c["layers"], n, n)]))


def bert_batch(batch: int, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """[CLS] A [SEP] B [SEP] with random ordinary tokens, no padding; 15% chosen by tfkit's mask_tokens.
    Returns masked ids, segment ids, flat chosen positions, their labels, (B, T) labels with -100
    elsewhere (transformers' convention), NSP labels."""
    from tfkit.recipes.bert import CLS, SEP, SPECIALS, mask_tokens

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
    from tfkit.recipes.bert import Bert, BertForPretraining
    from transformers import BertConfig, BertForPreTraining

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
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=c["heads"], intermediate_size=f,
        hidden_act="gelu", hidden_dropout_prob=c["dropout"], attention_probs_dropout_prob=c["dropout"],
        max_position_embeddings=n, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, attn_implementation="sdpa",
    )
    peer = training_side("BertForPreTraining", BertForPreTraining(bert_config), peer_loss)
    chosen = len(positions) / batch  # per sample; both sides are credited with MLM logits here only
    matmuls = [
        (layers * (4 * d * d + 2 * d * f), n),  # encoder: attention projections, feed-forward
        (d * d + 2 * d, 1),  # pooler and NSP classifier on [CLS]
        (d * d + vocab * d, chosen),  # MLM transform and output layer at the chosen positions
    ]
    return Row("BERT pretraining step (MLM+NSP)", ours, peer, flops=train_flops(batch, d, matmuls, [(layers, n, n)]))


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


# -- measuring ------------------------------------------------------------------------------------
def peak_allocated(call: Callable[[], Any]) -> int:
    """Peak of tensor bytes allocated minus freed during ``call``: from the CUDA caching allocator's
    statistics on a GPU, from the profiler's memory events on the CPU."""
    if SETUP.device.type == "cuda":
        synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else the profiler logs every start and stop to stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    return max(itertools.accumulate((e.extra_fields.alloc_size for e in allocations), initial=0))  # frees are < 0


def timed(call: Callable[[], Any]) -> float:
    synchronize()  # GPU work is asynchronous: time it from idle to idle
    start = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - start


def measure(r: Row, warmup: int, iters: int, peak_flops: float) -> dict[str, Any]:
    sides = [r.ours, r.peer]
    for _ in range(warmup - 1):
        for side in sides:
            side.call()
    peak = [side.resident() + peak_allocated(side.call) for side in sides]  # the last warm-up call
    times: list[list[float]] = [[], []]
    for i in range(iters):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            times[k].append(timed(sides[k].call))
    out: dict[str, Any] = {"row": r.name, "unit": "tokens/s" if r.tokens else "ms/step", "tokens_per_call": r.tokens}
    for key, side, ts, mem in zip(("tfkit", "peer"), sides, times, peak):
        seconds = statistics.median(ts)
        out[key] = {
            "name": side.name,
            "seconds": seconds,
            "value": r.tokens / seconds if r.tokens else 1e3 * seconds,
            "mfu": r.flops / seconds / peak_flops if r.flops else None,
            "peak_mib": mem / 2**20,
        }
    out["ratio"] = out["peer"]["seconds"] / out["tfkit"]["seconds"]
    out["train_gflop_per_step"] = r.flops / 1e9 if r.flops else None
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def matmul_size() -> int:
    """n of the n×n @ n×n product that measures the device's matmul rate."""
    return 8192 if SETUP.device.type == "cuda" else 2048


def matmul_flops(warmup: int, iters: int) -> float:
    """FLOP/s of the matmul_size() product in the benchmark's dtype on its device."""
    n = matmul_size()
    a, b = (torch.randn(n, n, device=SETUP.device, dtype=SETUP.dtype or torch.float32) for _ in range(2))
    for _ in range(warmup):
        a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b) for _ in range(iters))


# dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first name found in the
# device's name wins. Others: --peak-tflops, or the measured matmul rate.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0}


def peak_flops(warmup: int, iters: int, override_tflops: float | None) -> tuple[float, float, str]:
    """(the FLOP/s MFU is reported against, the measured matmul FLOP/s, what the first one is)."""
    measured, n = matmul_flops(warmup, iters), matmul_size()
    dtype = "bf16" if SETUP.dtype is torch.bfloat16 else "fp32"
    if override_tflops:
        return override_tflops * 1e12, measured, f"{override_tflops:.0f} TFLOP/s (--peak-tflops)"
    if SETUP.device.type == "cuda" and SETUP.dtype is torch.bfloat16:
        name = torch.cuda.get_device_name(SETUP.device)
        card = next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)
        if card:
            return card * 1e12, measured, f"{card:.0f} TFLOP/s ({name} dense bf16 peak; its {n}² matmul: {measured / 1e12:.0f})"
    return measured, measured, f"{measured / 1e9:,.0f} GFLOP/s ({dtype} {n}² matmul)"


CAPTION = (
    "median after warm-up; ratio = tfkit speed / peer speed (> 1: tfkit faster); "
    "MFU = (6·Σ matmul weights × tokens + 12·d·Σ queries × keys per attention module) × batch / step time / "
    "{peak}; peak = resident params, buffers, optimiser state + peak tensor bytes allocated in one call "
    "({memory}); threads: {threads}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 warm-up and 5 timed calls instead of 5 and 20")
    parser.add_argument("--json", help="also write the table to this JSON file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--only", help="run only the rows whose name contains this text")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides of the training rows")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast both sides")
    parser.add_argument("--size", choices=list(SIZES), default="small", help="small: the CPU targets' sizes; base: the papers' base models")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: a known card's bf16 peak, else the measured matmul)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.index is not None:
        torch.cuda.set_device(device)  # the allocator statistics and synchronize read the current device
    SETUP.device, SETUP.size, SETUP.compile = device, args.size, args.compile
    SETUP.dtype = torch.bfloat16 if args.precision == "bf16" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, iters = (2, 5) if args.quick else (5, 20)

    mfu_flops, matmul, peak_text = peak_flops(warmup, iters, args.peak_tflops)
    results = []
    for name, build in ROWS.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        torch.manual_seed(0)
        results.append(measure(build(), warmup, iters, mfu_flops))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next row's models start from a clean allocator

    threads = torch.get_num_threads()
    memory = "CUDA allocator statistics" if device.type == "cuda" else "torch.profiler"
    caption = CAPTION.format(peak=peak_text, memory=memory, threads=threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = f"tfkit vs peers ({where}, {args.precision}, {args.size} sizes{', training rows compiled' if args.compile else ''})"
    table = Table(title=title, caption=caption, caption_justify="left")
    for column in ("benchmark", "vs", "tfkit", "peer", "ratio", "MFU tfkit / peer", "peak MiB tfkit / peer"):
        names = column in ("benchmark", "vs")  # names wrap; numbers never do
        table.add_column(column, justify="left" if names else "right", no_wrap=not names)
    for r in results:
        ours, peer = r["tfkit"], r["peer"]
        value = "{:,.0f} tok/s" if r["tokens_per_call"] else "{:,.0f} ms"
        mfu = " / ".join(f"{side['mfu']:.0%}" for side in (ours, peer)) if ours["mfu"] is not None else "—"
        ratio = f"[{'green' if r['ratio'] >= 1 else 'red'}]{r['ratio']:.2f}×[/]"
        table.add_row(
            r["row"], peer["name"], value.format(ours["value"]), value.format(peer["value"]), ratio, mfu,
            f"{ours['peak_mib']:,.0f} / {peer['peak_mib']:,.0f}",
        )
    Console(width=None if sys.stdout.isatty() else 132).print(table)  # files and pipes get 80 columns

    if args.json:
        machine = {
            "torch": torch.__version__, "threads": threads, "cpu": cpu_name(), "cores": os.cpu_count(),
            "device": where, "precision": args.precision, "size": args.size, "mfu_peak_tflops": mfu_flops / 1e12,
            "matmul_gflops": matmul / 1e9, "warmup": warmup, "iters": iters, "compile": args.compile,
        }
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
