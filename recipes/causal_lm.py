"""Causal language modelling with the decoder-only Transformer (GPT; Radford et al., 2018, 2019).

Each position predicts the next token from the ones before it: causal self-attention, pre-LN blocks
(``gpt``: LayerNorm, GELU MLP, learned positions; ``llama``: RMSNorm, gated feed-forward, no biases,
with ``position: rotary``), the output layer tied to the token embeddings. Documents are joined by
an end-of-text token into one stream per split and cut into blocks of ``data.block_size`` tokens.
A byte-level BPE (GPT-2's) round-trips any text, so bits per byte compare across tokenizers and
with a compressor: ``evaluate`` prints xz's and gzip's beside the model's. Generation samples with a
KV cache (temperature, top-k, top-p), or greedily at temperature 0.

The built-in corpus is the Python standard library's own source (test suites left out), split by file.
"""

from __future__ import annotations

import gzip
import lzma
import math
import random
import sys
import sysconfig
from functools import cache
from pathlib import Path
from typing import Any, Iterator, TextIO

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

from tfkit import registry
from tfkit.data import SPLITS, cached, complete_splits, load_splits, read_lines, require_columns
from tfkit.errors import UsageError
from tfkit.hf import read_config, read_weights
from tfkit.inspect import capture_attention, head_type_scores
from tfkit.nn.blocks import CausalDecoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.linear import linear
from tfkit.nn.losses import linear_cross_entropy
from tfkit.recipe import AttentionExample, Batch, Loss, TokenizerRecipe, batch_ranges
from tfkit.registry import register

END_OF_TEXT = "<|endoftext|>"  # between documents; tfkit's tokenizers give it id 0, GPT-2's 50256
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "__pycache__"}


# -- data -------------------------------------------------------------------------------------------
def stdlib_source(seed: int) -> datasets.DatasetDict:
    """The standard library's .py files (one document each, test suites left out), split 90/5/5 by file."""

    def build() -> datasets.DatasetDict:
        root = Path(sysconfig.get_paths()["stdlib"])
        texts = []
        for path in sorted(root.rglob("*.py")):
            if SKIPPED_PACKAGES & set(path.relative_to(root).parts):
                continue
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
        random.Random(seed).shuffle(texts)
        cut = len(texts) // 20
        parts = {"validation": texts[:cut], "test": texts[cut : 2 * cut], "train": texts[2 * cut :]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": t}) for s, t in parts.items()})

    return cached("stdlib-source", {"seed": seed, "python": sys.version.split()[0]}, build)


def text_documents(path: Path) -> datasets.DatasetDict:
    """A .txt file as documents separated by blank lines."""
    lines = read_lines(path)
    documents, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": documents})})


def train_byte_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2's byte-level BPE: every byte is a base token, so any text round-trips; id 0 is END_OF_TEXT."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@cache
def byte_of_symbol() -> dict[str, int]:
    """GPT-2's map from the printable symbols byte-level BPE writes back to the bytes they stand for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[chr(byte)] = byte
        else:
            symbols[chr(256 + extra)] = byte
            extra += 1
    return symbols


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for (none for END_OF_TEXT)."""
    symbols = byte_of_symbol()
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    return [b"" if token == END_OF_TEXT else bytes(symbols[c] for c in token) for token in tokens]


def end_of_text(tokenizer: Tokenizer, where: Path | str) -> int:
    found = tokenizer.token_to_id(END_OF_TEXT)
    if found is None:
        raise UsageError(f"the tokenizer of {where} has no {END_OF_TEXT} token (a byte-level BPE as GPT-2's is needed)")
    return found


# -- the model --------------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """Token embeddings (+ positions where they act on embeddings), a causal stack, the tied output."""

    def __init__(self, vocab_size: int, d_model: int, heads: int, d_ff: int, layers: int, dropout: float,
                 activation: str, block: str, position: str, max_positions: int):
        super().__init__()
        self.max_positions = max_positions
        self.tokens = nn.Embedding(vocab_size, d_model)
        kind = registry.get("position", position)
        on_embeddings = kind.acts_on == "embeddings"
        self.position = kind(d_model, max_positions) if on_embeddings else None
        rotary = None if on_embeddings else kind(d_model // heads, max_positions)
        self.dropout = Dropout(dropout)
        self.decoder = CausalDecoder(block, layers, d_model, heads, d_ff, dropout, activation, rotary)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # GPT-2: N(0, 0.02), residual outputs scaled by 1/√(2·layers)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("out_proj.weight", "down.weight")) else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def new_cache(self, length: int = 16) -> list:
        return self.decoder.new_cache(length)

    def forward(self, token_ids: Tensor, cache: list | None = None, targets: Tensor | None = None) -> Tensor:
        """(B, T) ids → hidden states (B, T, D), or with ``targets`` (B, T) their cross-entropy summed
        (inside forward, so DDP and FSDP see the tied output weight used); with a cache,
        ``token_ids`` are the new positions."""
        offset = cache[0].length if cache else 0
        if offset + token_ids.size(1) > self.max_positions:
            raise UsageError(f"{offset + token_ids.size(1)} tokens are more than the model's {self.max_positions} positions")
        x = self.tokens(token_ids)
        if self.position is not None:
            x = self.position(x, offset)
        hidden = self.decoder(self.dropout(x), cache)
        if targets is None:
            return hidden
        return linear_cross_entropy(hidden.flatten(0, 1), self.tokens.weight, targets.flatten())

    def logits(self, hidden: Tensor) -> Tensor:
        return linear(hidden, self.tokens.weight)


class LSTMState:
    """The recurrent state carried between generation steps: what a KV cache is to the Transformer."""

    def __init__(self) -> None:
        self.state: tuple[Tensor, Tensor] | None = None
        self.length = 0


class LSTMLanguageModel(nn.Module):
    """The baseline the course notes read beside GPT: token embeddings, a stack of LSTMs of ``hidden``
    units whose outputs are projected back to d_model (Sak et al., 2014), the same tied output
    (Merity et al., 2018, without their regularisers). Same interface as :class:`CausalLM`."""

    def __init__(self, vocab_size: int, d_model: int, hidden: int, layers: int, dropout: float, max_positions: int):
        super().__init__()
        if hidden < d_model:
            raise UsageError(f"the LSTM's model.d_ff {hidden} (its hidden units) must be at least model.d_model {d_model}")
        self.max_positions = max_positions
        self.tokens = nn.Embedding(vocab_size, d_model)
        nn.init.uniform_(self.tokens.weight, -0.1, 0.1)  # as Zaremba et al. and Merity et al.: 0.02 left the tied logits too small to learn
        self.lstm = nn.LSTM(d_model, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0,
                            proj_size=d_model if hidden > d_model else 0)
        self.dropout = Dropout(dropout)

    def new_cache(self, length: int = 16) -> list[LSTMState]:
        return [LSTMState()]

    def forward(self, token_ids: Tensor, cache: list[LSTMState] | None = None, targets: Tensor | None = None) -> Tensor:
        state = cache[0] if cache else None
        hidden, carried = self.lstm(self.dropout(self.tokens(token_ids)), state.state if state else None)
        if state is not None:
            state.state, state.length = carried, state.length + token_ids.size(1)
        hidden = self.dropout(hidden)
        if targets is None:
            return hidden
        return linear_cross_entropy(hidden.flatten(0, 1), self.tokens.weight, targets.flatten())

    def logits(self, hidden: Tensor) -> Tensor:
        return linear(hidden, self.tokens.weight)


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """The next token from (V,) logits: the most likely at temperature 0; else drawn from the softmax at
    ``temperature`` over the ``top_k`` most likely tokens whose cumulative probability first reaches ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    values, indices = logits.float().topk(min(top_k, logits.numel()))
    probs = (values / temperature).softmax(-1)
    keep = probs.cumsum(-1) - probs < top_p  # the smallest set reaching top_p (the first always stays)
    probs = probs * keep
    return int(indices[torch.multinomial(probs / probs.sum(), 1, generator=generator)])


@torch.no_grad()
def generate(model: CausalLM, prompt: list[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             generator: torch.Generator, stop: int) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens (fewer at token ``stop``, END_OF_TEXT, or
    the model's last position), one forward pass per token over the KV cache."""
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.max_positions - len(prompt))
    cache = model.new_cache(len(prompt) + budget)
    hidden = model(torch.tensor([prompt], device=device), cache)
    out: list[int] = []
    for _ in range(budget):
        token = sample_next(model.logits(hidden[0, -1]), temperature, top_k, top_p, generator)
        if token == stop:
            break
        out.append(token)
        hidden = model(torch.tensor([[token]], device=device), cache)
    return out


# -- the recipe -------------------------------------------------------------------------------------
@register("recipe", "causal-lm")
class CausalLanguageModel(TokenizerRecipe):
    """Decoder-only Transformer (GPT): next-token prediction, generation, perplexity and bits per byte."""

    config_file = "causal-lm.yaml"

    def prepare(self, run_dir: Path | None = None) -> None:
        data, seed = self.config["data"], self.config["seed"]
        if data["block_size"] > self.config["model"]["max_positions"]:
            raise UsageError(f"data.block_size {data['block_size']} is more than model.max_positions {self.config['model']['max_positions']}")
        path = Path(data["name"]).expanduser()
        if path.suffix == ".txt":  # documents between blank lines, not datasets' one row per line
            splits = complete_splits(text_documents(path), seed, data["held_out"])
        else:
            splits = load_splits(data["name"], lambda: stdlib_source(seed), seed, held_out=data["held_out"], hub_config=data["hub_config"])
        texts = {}
        for split in SPLITS:
            require_columns(splits[split], split, [data["text_column"]], "data.text_column")
            texts[split] = [t for t in splits[split][data["text_column"]][:] if isinstance(t, str) and t.strip()]
            if not texts[split]:
                raise UsageError(f"the {split} data holds no text (column '{data['text_column']}')")
        if run_dir is not None:
            self.load(run_dir)
        else:
            init = self.config["init"]
            self.tokenizer = gpt2_tokenizer(Path(init)) if init else train_byte_bpe(texts["train"], data["vocab_size"])
            self.eot = end_of_text(self.tokenizer, init or "this run")
        self.streams = {split: self._stream(texts[split]) for split in SPLITS}  # (N,) int32 token ids
        self.token_bytes = token_bytes(self.tokenizer)
        self.byte_counts = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        self._compressed: dict[str, dict[str, float]] = {}  # by split: the compressors' figures, measured once
        block, batch = data["block_size"], self.config["train"]["batch_size"]
        for split in SPLITS:
            if len(self.streams[split]) <= block + 1:
                raise UsageError(f"the {split} text has {len(self.streams[split])} tokens, fewer than one block of data.block_size {block}")
        if len(self._blocks("train")) < batch:
            raise UsageError(f"the training text makes {len(self._blocks('train'))} blocks of data.block_size {block}, "
                             f"fewer than train.batch_size {batch} (lower either)")

    def load(self, run_dir: Path) -> None:
        super().load(run_dir)
        self.eot = end_of_text(self.tokenizer, run_dir / "tokenizer.json")

    def _stream(self, texts: list[str]) -> np.ndarray:
        """The documents' tokens, each followed by END_OF_TEXT, as one array."""
        ids = [e.ids + [self.eot] for e in self.tokenizer.encode_batch(texts)]
        return np.fromiter((i for row in ids for i in row), dtype=np.int32)

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        vocab = self.tokenizer.get_vocab_size()
        if m["family"] == "lstm":
            return LSTMLanguageModel(vocab, m["d_model"], m["d_ff"], m["layers"], m["dropout"], m["max_positions"])
        if m["family"] != "transformer":
            raise UsageError(f"unknown model.family '{m['family']}' (valid: transformer, lstm)")
        return CausalLM(vocab, m["d_model"], m["heads"], m["d_ff"], m["layers"], m["dropout"],
                        m["activation"], m["block"], m["position"], m["max_positions"])

    # -- training ---------------------------------------------------------------------------------
    def _blocks(self, split: str, shift: int = 0) -> np.ndarray:
        """Start of each block of block_size + 1 tokens (inputs and their next tokens), block_size apart."""
        block = self.config["data"]["block_size"]
        return np.arange(shift, len(self.streams[split]) - block, block)

    def _batch(self, split: str, starts: np.ndarray) -> Batch:
        block = self.config["data"]["block_size"]
        rows = torch.from_numpy(np.stack([self.streams[split][s : s + block + 1] for s in starts]).astype(np.int64))
        return {"token_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Blocks in a random order, and shifted by a random offset each epoch, both from (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.config["seed"] * 1_000_003 + epoch)
        shift = int(torch.randint(self.config["data"]["block_size"], (1,), generator=generator)) if epoch else 0
        starts = self._blocks("train", shift)
        order = torch.randperm(len(starts), generator=generator).numpy()
        size = self.config["train"]["batch_size"]
        for first in range(0, len(order) - size + 1, size):  # full batches only
            yield self._batch("train", starts[order[first : first + size]])

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        total = model(batch["token_ids"], targets=batch["targets"])
        return Loss([(total, batch["targets"].numel())], batch["targets"].numel())

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1) -> dict[int, tuple[float, int, int, int]]:
        """Per block of the held-out stream: the next-token loss summed (nats), right guesses, tokens, bytes."""
        model.eval()
        device = next(model.parameters()).device
        starts = self._blocks(split)
        out = {}
        for places in batch_ranges(len(starts), self.config["predict"]["batch_size"], rank, world):
            batch = self._batch(split, starts[places.start : places.stop])
            logits = model.logits(model(batch["token_ids"].to(device))).float().cpu()
            nats = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none").view_as(batch["targets"])
            right = logits.argmax(-1) == batch["targets"]
            for row, place in enumerate(places):
                out[place] = (nats[row].sum().item(), int(right[row].sum()), batch["targets"].size(1), int(self.byte_counts[batch["targets"][row].numpy()].sum()))
        return out

    def score(self, split: str, outputs: list[tuple[float, int, int, int]]) -> dict[str, float]:
        nats, right, tokens, size = (sum(column) for column in zip(*outputs))
        return {
            "loss": nats / tokens,
            "perplexity": math.exp(min(nats / tokens, 50.0)),
            "bits_per_byte": nats / math.log(2) / max(1, size),
            "accuracy": 100.0 * right / tokens,
            **self.compressor_bits_per_byte(split),
        }

    def compressor_bits_per_byte(self, split: str) -> dict[str, float]:
        """The floor to beat: bits per byte of xz -9e and gzip -9 on the same bytes the model predicts."""
        if split not in self._compressed:
            starts, block = self._blocks(split), self.config["data"]["block_size"]
            table = self.token_bytes
            text = b"".join(table[i] for s in starts for i in self.streams[split][s + 1 : s + block + 1].tolist())
            self._compressed[split] = {
                "xz_bits_per_byte": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / max(1, len(text)),
                "gzip_bits_per_byte": 8 * len(gzip.compress(text, 9)) / max(1, len(text)),
            }
        return self._compressed[split]

    # -- using a trained run ----------------------------------------------------------------------
    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, max_new_tokens: int | None = None, seed: int | None = None) -> None:
        """One continuation per prompt line (its newlines written as \\n, so one output line per input
        line); the same seed gives the same text. An empty or too long line is reported and left empty."""
        options = self.config["predict"]
        temperature = options["temperature"] if temperature is None else temperature
        top_k, top_p = top_k or options["top_k"], options["top_p"] if top_p is None else top_p
        max_new_tokens = max_new_tokens or options["max_new_tokens"]
        generator = torch.Generator().manual_seed(options["seed"] if seed is None else seed)
        model.eval()
        for number, line in enumerate(read_lines(path), 1):
            prompt = self.tokenizer.encode(line.replace("\\n", "\n")).ids
            if not line.strip() or len(prompt) >= model.max_positions:
                why = "empty line" if not line.strip() else f"{len(prompt)} tokens, as many as the model's {model.max_positions} positions"
                print(f"warning: {path}:{number}: {why}; its output line is left empty", file=sys.stderr)
                out.write("\n")
                continue
            text = self.tokenizer.decode(generate(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, self.eot))
            out.write(text.replace("\n", "\\n") + "\n")
            out.flush()

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        ids = self.tokenizer.encode(text).ids[: model.max_positions]
        if not ids:
            raise UsageError("the input text is empty")
        device = next(model.parameters()).device
        tokens = [self.tokenizer.decode([i]) for i in ids]
        model.eval()

        def head_types() -> dict[str, dict[str, list[float]]]:
            period = min(50, model.max_positions // 2)
            probe = torch.randint(1, self.tokenizer.get_vocab_size(), (1, period), generator=torch.Generator().manual_seed(0))
            with torch.no_grad(), capture_attention(model) as captured:
                model(probe.repeat(1, 2).to(device))
            return {name: head_type_scores(w[0].numpy(), period) for name, w in captured.items()}

        return AttentionExample(
            run=lambda: model(torch.tensor([ids], device=device)),
            tokens={"tokens": tokens},
            axes=lambda name: ("tokens", "tokens"),
            head_types=head_types,
        )

    # -- starting from GPT-2 (tfkit train causal-lm --init FOLDER) ----------------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        return {"model": gpt2_config(path)}

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        weights = gpt2_weights(path, len(model.decoder.layers))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})") from None


# -- Hugging Face GPT-2 folders ---------------------------------------------------------------------
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_config(folder: Path) -> dict[str, Any]:
    """model.* for a transformers GPT-2 folder's config.json."""
    hf = read_config(folder, "gpt2", "GPT-2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS or hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise UsageError(f"{folder}: only GPT-2s with GELU and LayerNorm eps 1e-5 can be imported")
    return {
        "block": "gpt", "position": "learned", "d_model": hf["n_embd"], "heads": hf["n_head"], "layers": hf["n_layer"],
        "d_ff": hf.get("n_inner") or 4 * hf["n_embd"], "activation": GPT2_ACTIVATIONS[activation], "max_positions": hf["n_positions"],
    }


def gpt2_weights(folder: Path, layers: int) -> dict[str, Tensor]:
    """A transformers GPT-2 checkpoint (GPT2Model or GPT2LMHeadModel, safetensors) in :class:`CausalLM`'s
    names; GPT-2's Conv1D layers store their weights as (in, out), so they are transposed."""
    hf = read_weights(folder, "transformer.")
    try:
        ours = {"tokens.weight": hf["wte.weight"], "position.table": hf["wpe.weight"],
                "decoder.norm.weight": hf["ln_f.weight"], "decoder.norm.bias": hf["ln_f.bias"]}
        for i in range(layers):
            theirs, mine = f"h.{i}.", f"decoder.layers.{i}."
            for conv, linear_name in (("attn.c_attn", "self_attn.in_proj"), ("attn.c_proj", "self_attn.out_proj"),
                                      ("mlp.c_fc", "feed_forward.up"), ("mlp.c_proj", "feed_forward.down")):
                ours[f"{mine}{linear_name}.weight"] = hf[f"{theirs}{conv}.weight"].t().contiguous()
                ours[f"{mine}{linear_name}.bias"] = hf[f"{theirs}{conv}.bias"]
            for norm, mine_norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
                for part in ("weight", "bias"):
                    ours[f"{mine}{mine_norm}.{part}"] = hf[f"{theirs}{norm}.{part}"]
    except KeyError as e:
        raise UsageError(f"{folder / 'model.safetensors'} is not a transformers GPT-2 checkpoint (no tensor {e})") from None
    return ours


def gpt2_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json, or GPT-2's vocab.json and merges.txt (a byte-level BPE)."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise UsageError(f"{folder} has no tokenizer.json, nor vocab.json and merges.txt")
