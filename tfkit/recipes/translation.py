"""Translation with the original encoder-decoder Transformer (Vaswani et al., 2017).

Shared BPE vocabulary and tied embeddings, sinusoidal positions, post-LN blocks with ReLU
feed-forwards, label smoothing, the warmup schedule, teacher forcing; greedy and beam search with a
KV cache; exact match, chrF and BLEU with sacrebleu. The built-in corpus is numbers written in English
and German words: German puts units before tens ("siebenundvierzig"), so the model must reorder.
"""

from __future__ import annotations

import functools
import math
import random
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import datasets
import sacrebleu
import torch
from num2words import num2words
from torch import Tensor, nn

from tfkit import config as configs
from tfkit import registry
from tfkit.data import (
    SPLITS,
    VOCAB_SAMPLE,
    cached,
    choose_vocab_size,
    encode_once,
    length_buckets,
    length_limit,
    load_splits,
    pad_rows,
    read_lines,
    require_columns,
    seeded_generator,
    train_bpe,
)
from tfkit.decode import beam_search, greedy_search
from tfkit.errors import UsageError
from tfkit.nn.blocks import Decoder, Encoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.linear import linear
from tfkit.nn.losses import linear_cross_entropy
from tfkit.onnx import GivenCache, Graph
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    TokenizerRecipe,
    Vocabulary,
    batch_ranges,
)
from tfkit.recipes.marian import (
    config_from_marian,
    export_marian,
    tokenizer_from_marian,
    weights_from_marian,
)
from tfkit.registry import register

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD, UNK, BOS, EOS = range(len(SPECIALS))
MAX_POSITIONS = 1024


def numbers_corpus(data: dict[str, Any], seed: int) -> datasets.DatasetDict:
    """Unique random numbers, spread evenly over digit counts, written out in two languages."""
    keys = ("source_lang", "target_lang", "train_size", "validation_size", "test_size", "max_number")
    key = {"seed": seed, **{k: data[k] for k in keys}}
    return cached("numbers", key, lambda: _numbers_corpus(data, seed))


def _numbers_corpus(data: dict[str, Any], seed: int) -> datasets.DatasetDict:
    sizes = {s: data[f"{s}_size"] for s in SPLITS}
    total, largest = sum(sizes.values()), data["max_number"]
    if total > largest + 1:
        raise UsageError(f"the builtin corpus needs {total} distinct numbers but data.max_number is {largest}")
    rng = random.Random(seed)
    digits = len(str(largest))
    seen: set[int] = set()
    numbers: list[int] = []
    while len(numbers) < total:
        d = rng.randint(1, digits)
        n = rng.randint(0 if d == 1 else 10 ** (d - 1), min(10**d - 1, largest))
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    out, start = {}, 0
    for split in SPLITS:
        chunk = numbers[start : start + sizes[split]]
        start += sizes[split]
        out[split] = datasets.Dataset.from_dict(
            {"source": [_words(n, data["source_lang"]) for n in chunk], "target": [_words(n, data["target_lang"]) for n in chunk]}
        )
    return datasets.DatasetDict(out)


def _words(n: int, lang: str) -> str:
    try:
        return num2words(n, lang=lang)
    except NotImplementedError:
        from num2words import CONVERTER_CLASSES

        raise UsageError(f"num2words does not know language '{lang}' (valid: {', '.join(sorted(CONVERTER_CLASSES))})") from None


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer whose one embedding matrix serves source, target and output."""

    def __init__(self, vocab_size: int, d_model: int, heads: int, d_ff: int, dropout: float, activation: str,
                 position: str, encoder: dict[str, Any], decoder: dict[str, Any]):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.position = registry.get("position", position)(d_model, MAX_POSITIONS)
        self.dropout = Dropout(dropout)
        sizes = dict(d_model=d_model, heads=heads, d_ff=d_ff, dropout=dropout, activation=activation)
        self.encoder = Encoder(encoder["block"], encoder["layers"], **sizes)
        self.decoder = Decoder(decoder["block"], decoder["layers"], **sizes)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # the output layer shares these weights, so keep logits O(1): N(0, 1/d), scaled by √d on input
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()

    def _embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        return self.dropout(self.position(self.embed(tokens) * math.sqrt(self.d_model), offset))

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        mask = (src != PAD)[:, None, None, :]  # (B, 1, 1, S): padding is never attended
        return self.encoder(self._embed(src), mask), mask

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: list | None = None, offset: int = 0) -> Tensor:
        hidden = self.decoder(self._embed(tgt, offset), memory, memory_mask, cache)
        return linear(hidden, self.embed.weight)  # (B, T, V)

    def forward(self, src: Tensor, tgt: Tensor, targets: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
        """Logits (B, T, V) for decoder inputs ``tgt``; given ``targets`` (B, T) instead the
        label-smoothed cross-entropy summed over the targets that are not padding, without keeping
        the logits (:func:`tfkit.nn.losses.linear_cross_entropy`)."""
        memory, mask = self.encode(src)
        if targets is None:
            return self.decode(tgt, memory, mask)
        hidden = self.decoder(self._embed(tgt), memory, mask)
        return linear_cross_entropy(hidden.flatten(0, 1), self.embed.weight, targets.flatten(), PAD, label_smoothing)


class EncoderGraph(nn.Module):
    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, source_ids: Tensor) -> Tensor:
        return self.model.encode(source_ids)[0]


class DecoderStep(nn.Module):
    """One step of incremental decoding with the self-attention cache as tensors (layers, B, H, T, d_k)."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor, memory: Tensor, source_ids: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        caches = [(GivenCache(k, v), None) for k, v in zip(past_keys.unbind(0), past_values.unbind(0))]
        logits = self.model.decode(token_ids, memory, (source_ids != PAD)[:, None, None, :], caches, offset=past_keys.size(3))
        return logits[:, -1], torch.stack([c.k for c, _ in caches]), torch.stack([c.v for c, _ in caches])


@register("recipe", "translation")
class Translation(TokenizerRecipe):
    """Encoder-decoder Transformer for translation: BPE, label smoothing, beam search, BLEU/chrF."""

    config_file = "translation.yaml"
    ranges = configs.ranges((*configs.AT_LEAST_1, ("max_number",)), (*configs.AT_LEAST_0, ("max_len_a", "max_len_b")))
    BUILTIN_SIZES = {"data.vocab_size": 400, "data.max_tokens": 128, "train.steps": 3000}  # what the numbers corpus needs

    def prepare(self, run_dir: Path | None = None) -> None:
        data, seed = self.config["data"], self.config["seed"]
        splits = load_splits(data["name"], lambda: numbers_corpus(data, seed), seed, hub_config=data["hub_config"])
        for split, rows in splits.items():
            if "translation" not in rows.column_names:  # the wmt layout holds both languages in one column
                require_columns(rows, split, [data["source_column"], data["target_column"]], "data.source_column and data.target_column")
        # validation and test are read whole; the training split stays an Arrow table (memory-mapped
        # when it comes from files or the cache) and is encoded into another, so a corpus of any
        # size costs memory only for its lengths
        self.pairs = {split: self._pairs(splits[split][:], split) for split in ("validation", "test")}
        train = splits["train"]
        sample = functools.cache(lambda: [text for pair in self._pairs(self._sample(train), "train") for text in pair])
        if run_dir is not None:
            self.load(run_dir)
        elif self.config["init"]:
            self.tokenizer = tokenizer_from_marian(Path(self.config["init"]), SPECIALS)
        else:
            fit = lambda texts, size: train_bpe(texts, size, SPECIALS)  # noqa: E731
            self.settle("data.vocab_size", lambda: choose_vocab_size(sample(), fit, 2 * len(train)))
            texts = (text for start in range(0, len(train), 10_000)
                     for pair in self._pairs(train[start : start + 10_000], "train", start) for text in pair)
            self.tokenizer = train_bpe(texts, data["vocab_size"], SPECIALS)
        self.settle("data.max_tokens", lambda: length_limit(len(e.ids) for e in self.tokenizer.encode_batch(sample())))
        self.settle_steps(len(train))
        self.sources = {s: self._source_ids([src for src, _ in self.pairs[s]]) for s in ("validation", "test")}
        settings = [*(data[k] for k in ("source_lang", "target_lang", "source_column", "target_column", "max_tokens")), self.tokenizer.to_str()]
        self.train = encode_once(train, self._encode, settings)
        self.train_lengths: list[int] = self.train["length"][:]  # a list: a Column reads Arrow item by item

    def imitate_builtin_data(self) -> None:
        self.tokenizer = Vocabulary(self.BUILTIN_SIZES["data.vocab_size"])

    @staticmethod
    def _sample(rows: datasets.Dataset) -> dict[str, list]:
        """At most VOCAB_SAMPLE / 2 rows, evenly spaced, as {column: values}: what sizes are measured on."""
        step = max(1, math.ceil(2 * len(rows) / VOCAB_SAMPLE))
        return rows[::step] if step > 1 else rows[:]

    def _pairs(self, rows: dict[str, list], split: str, first: int = 0) -> list[tuple[str, str]]:
        """The (source, target) texts of rows given as {column: values}; they are rows first, first + 1, ..."""
        data = self.config["data"]
        if "translation" in rows:
            langs = data["source_lang"], data["target_lang"]
            pairs = [tuple(row.get(lang) for lang in langs) for row in rows["translation"]]
        else:
            pairs = list(zip(rows[data["source_column"]], rows[data["target_column"]]))
        for i, pair in enumerate(pairs):
            if not all(isinstance(text, str) and text.strip() for text in pair):
                raise UsageError(f"the {split} data's row {first + i + 1} lacks a source or target text: {pair!r}")
        return pairs

    def _encode(self, rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        pairs = self._pairs(rows, "train", indices[0])
        sources = self._source_ids([src for src, _ in pairs])
        targets = [[BOS, *ids, EOS] for ids in self._ids([tgt for _, tgt in pairs])]
        return {"source": sources, "target": targets, "length": [len(ids) for ids in sources]}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        limit = self.config["data"]["max_tokens"]
        return [e.ids[:limit] for e in self.tokenizer.encode_batch(texts)]

    def _source_ids(self, texts: list[str]) -> list[list[int]]:
        return [[*ids, EOS] for ids in self._ids(texts)]

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return Seq2SeqTransformer(
            self.tokenizer.get_vocab_size(), m["d_model"], m["heads"], m["d_ff"], m["dropout"], m["activation"],
            m["position"], m["encoder"], m["decoder"],
        )

    # -- training ---------------------------------------------------------------------------------
    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Shuffled batches of sentences of similar length: each pool of 100 batches is sorted by length."""
        generator = seeded_generator(self.config["seed"], epoch)
        for rows in length_buckets(self.train_lengths, self.config["train"]["batch_size"], generator, pool=100):
            chunk = self.train[rows]
            target = pad_rows(chunk["target"], PAD)
            yield {"src": pad_rows(chunk["source"], PAD), "tgt_in": target[:, :-1], "tgt_out": target[:, 1:]}

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        total = model(batch["src"], batch["tgt_in"], batch["tgt_out"], self.config["train"]["label_smoothing"])
        tokens = int((batch["tgt_out"] != PAD).sum())
        return Loss([(total, tokens)], tokens)

    # -- using the model --------------------------------------------------------------------------
    def translate(self, model: nn.Module, sources: list[list[int]], beam: int | None = None, rank: int = 0, world: int = 1) -> dict[int, str]:
        """Detokenised translations of token-id sources, keyed by their place, decoded in length-sorted
        batches (of them, process ``rank`` of ``world`` decodes its share: :func:`batch_ranges`)."""
        decode = self.config["decode"]
        beam = beam or decode["beam"]
        device = next(model.parameters()).device
        model.eval()
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: dict[int, str] = {}
        for places in batch_ranges(len(order), decode["batch_size"], rank, world):
            rows = order[places.start : places.stop]
            src = pad_rows([sources[i] for i in rows], PAD).to(device)
            max_len = min(MAX_POSITIONS, int(decode["max_len_a"] * src.size(1) + decode["max_len_b"]))
            if beam == 1:
                hyps = greedy_search(model, src, BOS, EOS, max_len)
            else:
                hyps = beam_search(model, src, BOS, EOS, max_len, beam, decode["length_penalty"])
            out.update(zip(rows, self.tokenizer.decode_batch(hyps)))
        return out

    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1, beam: int | None = None) -> dict[int, str]:
        return self.translate(model, self.sources[split], beam, rank, world)

    def score(self, split: str, hyps: list[str]) -> dict[str, float]:
        refs = [tgt for _, tgt in self.pairs[split]]
        return {
            "exact_match": 100.0 * sum(h == r for h, r in zip(hyps, refs)) / len(refs),
            "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        }

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, beam: int | None = None) -> None:
        lines = read_lines(path)
        filled = [i for i, line in enumerate(lines) if line.strip()]
        for i, line in enumerate(lines):
            if not line.strip():
                print(f"warning: {path}:{i + 1}: empty line, its translation is left empty", file=sys.stderr)
        limit = self.config["data"]["max_tokens"]
        for i, encoding in zip(filled, self.tokenizer.encode_batch([lines[i] for i in filled])):
            if len(encoding.ids) > limit:
                print(f"warning: {path}:{i + 1}: {len(encoding.ids)} tokens, more than data.max_tokens {limit}; "
                      f"only the first {limit} are translated", file=sys.stderr)
        translated = self.translate(model, self._source_ids([lines[i] for i in filled]), beam)
        translations = {line: translated[place] for place, line in enumerate(filled)}
        for i in range(len(lines)):
            out.write(translations.get(i, "") + "\n")

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        """The encoder, (B, S) source ids → memory (B, S, D); and one decoder step, the last target
        token (B, 1), the memory, the source ids (for its padding) and the self-attention keys and
        values of the T tokens before → the next token's logits (B, V) and the keys and values of T + 1.
        Cross-attention's keys and values are computed from the memory inside each step."""
        m, vocab = self.config["model"], self.tokenizer.get_vocab_size()
        layers, heads, d_model = m["decoder"]["layers"], m["heads"], m["d_model"]

        def sources(batch: int, length: int, generator: torch.Generator) -> Tensor:
            ids = torch.randint(4, vocab, (batch, length), generator=generator)
            ids[1:, length // 2 :] = PAD  # padded rows, so the masks matter
            return ids

        def encoder_example(batch: int, length: int) -> dict[str, Tensor]:
            return {"source_ids": sources(batch, length, torch.Generator().manual_seed(batch * 1000 + length))}

        def step_example(batch: int, length: int) -> dict[str, Tensor]:
            generator = torch.Generator().manual_seed(batch * 1000 + length)
            source_ids = sources(batch, length + 3, generator)
            past = torch.randn(2, layers, batch, heads, length, d_model // heads, generator=generator)
            return {"token_ids": torch.randint(4, vocab, (batch, 1), generator=generator),
                    "memory": torch.randn(batch, length + 3, d_model, generator=generator), "source_ids": source_ids,
                    "past_keys": past[0], "past_values": past[1]}

        source = {0: "batch", 1: "source"}
        past = {1: "batch", 3: "past"}
        return [
            Graph("encoder", EncoderGraph(model), encoder_example, ["memory"], {"source_ids": source},
                  limits={"source": {"max": MAX_POSITIONS}}),
            Graph("decoder_step", DecoderStep(model), step_example, ["logits", "present_keys", "present_values"],
                  {"token_ids": {0: "batch"}, "memory": source, "source_ids": source, "past_keys": past, "past_values": past},
                  limits={"source": {"max": MAX_POSITIONS}, "past": {"max": MAX_POSITIONS - 1}}),
        ]

    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        return {"model": config_from_marian(path)}

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        m = self.config["model"]
        try:
            model.load_state_dict(weights_from_marian(path, m["d_model"], m["encoder"]["layers"], m["decoder"]["layers"]))
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})") from None

    def export_hf(self, model: nn.Module, out: Path) -> None:
        export_marian(self.config["model"], model.state_dict(), self.tokenizer, {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS},
                      MAX_POSITIONS, self.config["data"]["max_tokens"], out)

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        decode = self.config["decode"]
        return {**super().onnx_processing(out), "pad_id": PAD, "bos_id": BOS, "eos_id": EOS, "max_tokens": self.config["data"]["max_tokens"],
                "max_len_a": decode["max_len_a"], "max_len_b": decode["max_len_b"],
                "inputs": "source_ids: the source's ids from tokenizer.json, then eos_id, padded with pad_id",
                "outputs": "greedy: run the encoder once; start with token_ids [[bos_id]] and past keys and values with 0 positions "
                           "(layers, B, heads, 0, d_model / heads); each step's argmax is the next token and its present keys and "
                           "values the next past, until eos_id or max_len_a * source length + max_len_b tokens"}

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        if not text.strip():
            raise UsageError("the input text is empty")
        device = next(model.parameters()).device
        (source,) = self._source_ids([text])
        src = torch.tensor([source], device=device)
        model.eval()
        (output,) = greedy_search(model, src, BOS, EOS, int(self.config["decode"]["max_len_a"] * len(source) + self.config["decode"]["max_len_b"]))
        target = [BOS, *output]  # decoder inputs: each position predicts the next token
        tgt = torch.tensor([target], device=device)

        def axes(name: str) -> tuple[str, str]:
            if name.startswith("encoder."):
                return "source", "source"
            return ("target", "source") if name.endswith("cross_attn") else ("target", "target")

        tokens = {"source": [self.tokenizer.id_to_token(i) for i in source], "target": [self.tokenizer.id_to_token(i) for i in target]}
        predicted = [self.tokenizer.id_to_token(i) for i in [*output, EOS]]  # what each decoder position predicts

        def page(weights: dict) -> dict:
            cross = [name for name in weights if name.endswith("cross_attn")]
            return {"panels": [{"kind": "alignment", "title": "source × target alignment (cross-attention)", "modules": cross, "rows": predicted}]}

        return AttentionExample(run=lambda: model(src, tgt), tokens=tokens, axes=axes, page=page)
