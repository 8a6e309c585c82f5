"""The ``causal-lm`` recipe: documents joined by END_OF_TEXT into one token stream per split, cut into
blocks of ``data.block_size`` tokens; next-token loss; perplexity, bits per byte beside xz and gzip,
accuracy; continuations of prompt lines; causal heatmaps and head-type scores; ``--init`` from GPT-2.

A validation during training scores a fixed sample of the split, ``data.eval_blocks`` blocks evenly
spaced through it (on a 321 MB corpus a full pass was 5.5 minutes at every validation), so that
validations compare with one another; ``tfkit evaluate`` scores every block. xz and gzip are run
once per split and sample, on the very bytes the model is scored on."""

from __future__ import annotations

import gzip
import lzma
import math
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from tfkit import config as configs
from tfkit.data import SPLITS, choose_vocab_size, read_lines, seeded_generator
from tfkit.errors import UsageError
from tfkit.inspect import capture_attention, head_type_scores
from tfkit.onnx import Graph
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    TokenizerRecipe,
    Vocabulary,
    batch_ranges,
)
from tfkit.recipes.causal_lm import interop
from tfkit.recipes.causal_lm.data import (
    Documents,
    TextStream,
    end_of_text,
    load_tokenizer,
    read_documents,
    token_bytes,
    token_stream,
    train_byte_bpe,
)
from tfkit.recipes.causal_lm.generate import stream
from tfkit.recipes.causal_lm.model import CausalLM, LSTMLanguageModel
from tfkit.registry import register

VOCAB_SAMPLE_CHARACTERS = 5_000_000
INDUCTION_HEAD = 0.4  # an induction score above this marks an induction head


@register("recipe", "causal-lm")
class CausalLanguageModel(TokenizerRecipe):
    """Decoder-only Transformer (GPT): next-token prediction, generation, perplexity and bits per byte."""

    config_file = "causal-lm.yaml"
    minimised = ("perplexity", "bits_per_byte")
    ranges = configs.ranges(
        (*configs.AT_LEAST_1, ("block_size", "stride")), (*configs.FRACTION, ("held_out",)), (*configs.OFF_AT_0, ("eval_blocks",))
    )
    choices = {"model.family": ("transformer", "lstm")}
    BUILTIN_SIZES = {"data.vocab_size": 4096, "train.steps": 1000}  # what the standard library's source needs

    def prepare(self, run_dir: Path | None = None) -> None:
        data = self.config["data"]
        if data["block_size"] > self.config["model"]["max_positions"]:
            raise UsageError(
                f"data.block_size {data['block_size']} is more than model.max_positions {self.config['model']['max_positions']}"
            )
        documents = read_documents(data, self.config["seed"])
        if run_dir is not None:
            self.load(run_dir)
        else:
            init = self.config["init"]
            if not init:
                self.settle("data.vocab_size", lambda: self._vocab_size(documents["train"]))
            self._use(
                load_tokenizer(Path(init)) if init else train_byte_bpe(documents["train"], data["vocab_size"]), init or "this run"
            )
        self.streams = {
            split: token_stream(documents[split], self.tokenizer, self.eot, split) for split in SPLITS
        }  # (N,) int32, memory-mapped
        self._compressed: dict[
            tuple[str, bool], dict[str, float]
        ] = {}  # by split and sample: the compressors' figures, measured once
        block, batch = data["block_size"], self.config["train"]["batch_size"]
        for split in SPLITS:
            if len(self.streams[split]) <= block + 1:
                raise UsageError(
                    f"the {split} text has {len(self.streams[split])} tokens, fewer than one block of data.block_size {block}"
                )
        if len(self._blocks("train")) < batch:
            raise UsageError(
                f"the training text makes {len(self._blocks('train'))} blocks of data.block_size {block}, "
                f"fewer than train.batch_size {batch} (lower either)"
            )
        self.settle_steps(len(self._blocks("train")))

    @staticmethod
    def _vocab_size(documents: Documents) -> tuple[int, str]:
        """data.vocab_size from about VOCAB_SAMPLE_CHARACTERS of the training documents, evenly spaced."""
        sample, count = documents.sample(VOCAB_SAMPLE_CHARACTERS)
        return choose_vocab_size(sample, train_byte_bpe, count)

    def imitate_builtin_data(self) -> None:
        self.tokenizer = Vocabulary(self.BUILTIN_SIZES["data.vocab_size"])

    def load(self, run_dir: Path) -> None:
        super().load(run_dir)
        self._use(self.tokenizer, run_dir / "tokenizer.json")

    def _use(self, tokenizer: Tokenizer, where: Path | str) -> None:
        """The tokenizer, and what is read off it: END_OF_TEXT's id and the bytes behind every token."""
        self.tokenizer, self.eot = tokenizer, end_of_text(tokenizer, where)
        self.token_bytes = token_bytes(tokenizer)
        self.byte_counts = np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        vocab = self.tokenizer.get_vocab_size()
        if m["family"] == "lstm":
            return LSTMLanguageModel(vocab, m["d_model"], m["d_ff"], m["layers"], m["dropout"], m["max_positions"])
        if m["family"] != "transformer":
            raise UsageError(f"unknown model.family '{m['family']}' (valid: transformer, lstm)")
        return CausalLM(
            vocab,
            m["d_model"],
            m["heads"],
            m["d_ff"],
            m["layers"],
            m["dropout"],
            m["activation"],
            m["block"],
            m["position"],
            m["max_positions"],
            m["attention"],
            m["feed_forward"],
            m["norm"],
        )

    # -- training ---------------------------------------------------------------------------------
    def _blocks(self, split: str, shift: int = 0) -> np.ndarray:
        """Start of each block of block_size + 1 tokens (inputs and their next tokens), block_size apart."""
        block = self.config["data"]["block_size"]
        return np.arange(shift, len(self.streams[split]) - block, block)

    def _sample(self, split: str) -> np.ndarray:
        """The blocks a validation during training scores: ``data.eval_blocks`` of them evenly spaced
        through the split (the same ones every time), or all of them if there are no more (or it is 0)."""
        starts, limit = self._blocks(split), self.config["data"].get("eval_blocks", 0)  # a run from before the key: all
        if not limit or len(starts) <= limit:
            return starts
        return starts[np.arange(limit) * len(starts) // limit]

    def _batch(self, split: str, starts: np.ndarray) -> Batch:
        block = self.config["data"]["block_size"]
        rows = torch.from_numpy(np.stack([self.streams[split][s : s + block + 1] for s in starts]).astype(np.int64))
        return {"token_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Blocks in a random order, and shifted by a random offset each epoch, both from (seed, epoch)."""
        generator = seeded_generator(self.config["seed"], epoch)
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
    def _windows(self, split: str, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """The Hugging Face perplexity guide's sliding window: starts of windows of block_size + 1
        tokens, ``stride`` apart, and how many of each window's first targets were scored by the
        window before (all of the first window's count). A later window thus predicts its new tokens
        from up to block_size - stride more tokens of context than a block would. The tokens scored
        are the blocks' (``stride`` = block_size), whatever the stride, so strides compare."""
        block = self.config["data"]["block_size"]
        if stride > block:
            raise UsageError(f"--stride {stride} is more than data.block_size {block} (tokens between windows would go unscored)")
        last = len(self._blocks(split)) * block  # the last target the blocks score
        ends = np.arange(block, last + 1, stride)
        if ends[-1] != last:
            ends = np.append(ends, last)
        return ends - block, block - np.diff(ends, prepend=0)

    def evaluate(self, model: nn.Module, split: str, **options: Any) -> dict[str, float]:
        """``tfkit evaluate``: every block of the split, not the sample a validation during training scores."""
        return super().evaluate(model, split, **{"whole": True, **options})

    @torch.no_grad()
    def eval_outputs(
        self, model: nn.Module, split: str, rank: int = 0, world: int = 1, stride: int | None = None, whole: bool = False
    ) -> dict[int, tuple[float, int, int, int]]:
        """Per window of the held-out stream (a block when ``stride`` is block_size, the default): the
        next-token loss summed over its scored tokens (nats), right guesses, tokens, bytes. Without
        ``whole`` or ``stride`` (a validation during training), the blocks of :meth:`_sample` only."""
        model.eval()
        device = next(model.parameters()).device
        if whole or stride:
            starts, seen = self._windows(split, stride or self.config["data"]["block_size"])
        else:
            starts = self._sample(split)
            seen = np.zeros(len(starts), dtype=np.int64)
        out = {}
        for places in batch_ranges(len(starts), self.config["predict"]["batch_size"], rank, world):
            batch = self._batch(split, starts[places.start : places.stop])
            logits = model.logits(model(batch["token_ids"].to(device))).float().cpu()
            nats = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none").view_as(batch["targets"])
            right = logits.argmax(-1) == batch["targets"]
            for row, place in enumerate(places):
                new = slice(int(seen[place]), None)
                targets = batch["targets"][row, new]
                out[place] = (
                    nats[row, new].sum().item(),
                    int(right[row, new].sum()),
                    targets.numel(),
                    int(self.byte_counts[targets.numpy()].sum()),
                )
        return out

    def score(self, split: str, outputs: list[tuple[float, int, int, int]]) -> dict[str, float]:
        nats, right, tokens, size = (sum(column) for column in zip(*outputs))
        return {
            "loss": nats / tokens,
            "perplexity": math.exp(min(nats / tokens, 50.0)),
            "bits_per_byte": nats / math.log(2) / max(1, size),
            "accuracy": 100.0 * right / tokens,
            # fewer outputs than blocks: the sample (windows, at a stride up to block_size, are never fewer)
            **self.compressor_bits_per_byte(split, sampled=len(outputs) < len(self._blocks(split))),
        }

    def compressor_bits_per_byte(self, split: str, sampled: bool = False) -> dict[str, float]:
        """The floor to beat: bits per byte of xz -9e and gzip -9 on the same bytes the model predicts
        (the blocks of the sample, or all), measured once per split and sample."""
        if (split, sampled) not in self._compressed:
            starts, block = self._sample(split) if sampled else self._blocks(split), self.config["data"]["block_size"]
            table = self.token_bytes
            text = b"".join(table[i] for s in starts for i in self.streams[split][s + 1 : s + block + 1].tolist())
            self._compressed[split, sampled] = {
                "xz_bits_per_byte": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / max(1, len(text)),
                "gzip_bits_per_byte": 8 * len(gzip.compress(text, 9)) / max(1, len(text)),
            }
        return self._compressed[split, sampled]

    # -- using a trained run ----------------------------------------------------------------------
    def predict_file(
        self,
        model: nn.Module,
        path: Path,
        out: TextIO,
        top_k: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
    ) -> None:
        """One continuation per prompt line (its newlines written as \\n, so one output line per input
        line); the same seed gives the same text. On a terminal each continuation is written as it is
        generated. An empty or too long line is reported and left empty."""
        options = self.config["predict"]
        temperature = options["temperature"] if temperature is None else temperature
        top_k, top_p = top_k or options["top_k"], options["top_p"] if top_p is None else top_p
        max_new_tokens = max_new_tokens or options["max_new_tokens"]
        penalty = repetition_penalty or options["repetition_penalty"]
        generator = torch.Generator().manual_seed(options["seed"] if seed is None else seed)
        live = out.isatty()
        model.eval()
        for number, line in enumerate(read_lines(path), 1):
            prompt = self.tokenizer.encode(line.replace("\\n", "\n")).ids
            if not line.strip() or len(prompt) >= model.max_positions:
                why = (
                    "empty line"
                    if not line.strip()
                    else f"{len(prompt)} tokens, as many as the model's {model.max_positions} positions"
                )
                print(f"warning: {path}:{number}: {why}; its output line is left empty", file=sys.stderr)
                out.write("\n")
                continue
            tokens = stream(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, self.eot, penalty)
            if live:
                text = TextStream(self.token_bytes)
                for token in tokens:
                    out.write(text.add(token).replace("\n", "\\n"))
                    out.flush()
                out.write(text.end().replace("\n", "\\n") + "\n")
            else:
                out.write(self.tokenizer.decode(list(tokens)).replace("\n", "\\n") + "\n")
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
            head_types_title="head types, on random tokens repeated twice (* induction head)",
            head_type_marks={"induction": INDUCTION_HEAD},
        )

    # -- starting from GPT-2 or Llama (tfkit train causal-lm --init FOLDER), and going back ----------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        return {"model": interop.config_from_hf(path)}

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        weights = interop.weights_from_hf(path, len(model.decoder.layers))
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(
                f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})"
            ) from None

    def export_hf(self, model: nn.Module, out: Path) -> None:
        interop.export_hf(self.config["model"], model.state_dict(), self.tokenizer, self.eot, out)

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        return [interop.onnx_graph(model, self.tokenizer.get_vocab_size(), self.config["model"]["max_positions"])]

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        return {
            **super().onnx_processing(out),
            "end_of_text": self.eot,
            "max_positions": self.config["model"]["max_positions"],
            "outputs": "logits (B, T, V): position t's scores for token t + 1; generate by appending the chosen token and running again",
        }
