"""The translation recipe's hooks: a joint BPE vocabulary over both languages, batches of sentences
of similar length, label-smoothed teacher forcing, greedy and beam search over the KV cache, exact
match, chrF and BLEU with sacrebleu, translating a file, and the cross-attention alignment to inspect.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import datasets
import sacrebleu
import torch
from torch import nn

from tfkit import config as configs
from tfkit.data import (
    Unusable,
    choose_vocab_size,
    encode_once,
    length_buckets,
    length_limit,
    load_splits,
    pad_rows,
    read_lines,
    report_unusable,
    require_columns,
    seeded_generator,
    train_bpe,
)
from tfkit.decode import beam_search, greedy_search
from tfkit.errors import UsageError
from tfkit.onnx import Graph
from tfkit.progress import Preparing
from tfkit.recipe import (
    AttentionExample,
    Batch,
    Loss,
    TokenizerRecipe,
    Vocabulary,
    batch_ranges,
)
from tfkit.recipes.translation import interop
from tfkit.recipes.translation.data import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    numbers_corpus,
    read_pairs,
    sample_rows,
    usable_pairs,
)
from tfkit.recipes.translation.model import MAX_POSITIONS, Seq2SeqTransformer
from tfkit.registry import register


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
                require_columns(
                    rows, split, [data["source_column"], data["target_column"]], "data.source_column and data.target_column"
                )
        # validation and test are read whole; the training split stays an Arrow table (memory-mapped
        # when it comes from files or the cache) and is encoded into another, so a corpus of any
        # size costs memory only for its lengths
        self.pairs = {split: usable_pairs(splits[split][:], data, split) for split in ("validation", "test")}
        train = splits["train"]
        sample = functools.cache(lambda: [text for pair in self._pairs(sample_rows(train)) for text in pair])
        unusable = None  # the training rows without both texts, when the tokenizer's pass has counted them
        if run_dir is not None:
            self.load(run_dir)
        elif self.config["init"]:
            self.tokenizer = interop.tokenizer_from_marian(Path(self.config["init"]), SPECIALS)
        else:
            if not sample():  # the pass that counts them comes after the tokenizer
                raise UsageError(
                    f"none of the sampled rows of the train data has both a source and a target text "
                    f"(columns {data['source_column']!r} and {data['target_column']!r})"
                )
            fit = lambda texts, size: train_bpe(texts, size, SPECIALS)  # noqa: E731
            self.settle("data.vocab_size", lambda: choose_vocab_size(sample(), fit, 2 * len(train)))
            unusable = Unusable("sentence pairs", "train")
            with Preparing("training the tokenizer on the train pairs", total=len(train), unit="pairs") as shown:
                self.tokenizer = train_bpe(self._texts(train, shown, unusable), data["vocab_size"], SPECIALS)
            unusable.report(len(train))  # too many stop here, before the encoding pass
        self.settle("data.max_tokens", lambda: length_limit(len(e.ids) for e in self.tokenizer.encode_batch(sample())))
        self.settle_steps(len(train))
        self.sources = {s: self._source_ids([src for src, _ in self.pairs[s]]) for s in ("validation", "test")}
        # "problem": the column naming an unusable row (a cache written before it is not reused)
        settings = [
            *(data[k] for k in ("source_lang", "target_lang", "source_column", "target_column", "max_tokens")),
            self.tokenizer.to_str(),
            "problem",
        ]
        with Preparing("encoding the train pairs", total=len(train), unit="pairs") as shown:
            self.train = encode_once(train, lambda rows, indices: self._encode(rows, indices, shown), settings)
        if unusable is None:
            report_unusable(self.train, "train", "sentence pairs")
        if any(self.train["problem"][:]):
            self.train = self.train.filter(lambda problem: not problem, input_columns="problem")
        self.train_lengths: list[int] = self.train["length"][:]  # a list: a Column reads Arrow item by item

    def imitate_builtin_data(self) -> None:
        self.tokenizer = Vocabulary(self.BUILTIN_SIZES["data.vocab_size"])

    def _pairs(self, rows: dict[str, list], first: int = 0) -> list[tuple[str, str]]:
        """The usable pairs of some training rows (the unusable ones are reported once they are encoded)."""
        return [pair for pair in read_pairs(rows, self.config["data"], first)[0] if pair is not None]

    def _texts(self, train: datasets.Dataset, shown: Preparing, unusable: Unusable) -> Iterator[str]:
        """Both texts of every usable training pair, read 10,000 rows at a time; the others go to ``unusable``."""
        for start in range(0, len(train), 10_000):
            rows = train[start : start + 10_000]
            pairs, problems = read_pairs(rows, self.config["data"], start)
            for pair in filter(None, pairs):
                yield from pair
            for problem in problems:
                unusable.skip(problem)
            shown.advance(len(next(iter(rows.values()))))

    def _encode(self, rows: dict[str, list], indices: list[int], shown: Preparing) -> dict[str, list]:
        """Token ids of each row's pair; a row without both texts keeps empty ids and says why."""
        pairs, problems = read_pairs(rows, self.config["data"], indices[0])
        why = iter(problems)
        usable = [pair for pair in pairs if pair is not None]
        sources = iter(self._source_ids([src for src, _ in usable]))
        targets = iter([[BOS, *ids, EOS] for ids in self._ids([tgt for _, tgt in usable])])
        out: dict[str, list] = {"source": [], "target": [], "length": [], "problem": []}
        for pair in pairs:
            source, target = (next(sources), next(targets)) if pair is not None else ([], [])
            out["source"].append(source)
            out["target"].append(target)
            out["length"].append(len(source))
            out["problem"].append("" if pair is not None else next(why))
        shown.advance(len(indices))
        return out

    def _ids(self, texts: list[str]) -> list[list[int]]:
        limit = self.config["data"]["max_tokens"]
        return [e.ids[:limit] for e in self.tokenizer.encode_batch(texts)]

    def _source_ids(self, texts: list[str]) -> list[list[int]]:
        return [[*ids, EOS] for ids in self._ids(texts)]

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return Seq2SeqTransformer(
            self.tokenizer.get_vocab_size(),
            m["d_model"],
            m["heads"],
            m["d_ff"],
            m["dropout"],
            m["activation"],
            m["position"],
            m["encoder"],
            m["decoder"],
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
    def translate(
        self, model: nn.Module, sources: list[list[int]], beam: int | None = None, rank: int = 0, world: int = 1
    ) -> dict[int, str]:
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

    def eval_outputs(
        self, model: nn.Module, split: str, rank: int = 0, world: int = 1, beam: int | None = None
    ) -> dict[int, str]:
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
                print(
                    f"warning: {path}:{i + 1}: {len(encoding.ids)} tokens, more than data.max_tokens {limit}; "
                    f"only the first {limit} are translated",
                    file=sys.stderr,
                )
        translated = self.translate(model, self._source_ids([lines[i] for i in filled]), beam)
        translations = {line: translated[place] for place, line in enumerate(filled)}
        for i in range(len(lines)):
            out.write(translations.get(i, "") + "\n")

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        return interop.onnx_graphs(model, self.config["model"], self.tokenizer.get_vocab_size())

    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        return {"model": interop.config_from_marian(path)}

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        m = self.config["model"]
        try:
            model.load_state_dict(interop.weights_from_marian(path, m["d_model"], m["encoder"]["layers"], m["decoder"]["layers"]))
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(
                f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})"
            ) from None

    def export_hf(self, model: nn.Module, out: Path) -> None:
        interop.export_marian(
            self.config["model"],
            model.state_dict(),
            self.tokenizer,
            {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS},
            MAX_POSITIONS,
            self.config["data"]["max_tokens"],
            out,
        )

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        decode = self.config["decode"]
        return {
            **super().onnx_processing(out),
            "pad_id": PAD,
            "bos_id": BOS,
            "eos_id": EOS,
            "max_tokens": self.config["data"]["max_tokens"],
            "max_len_a": decode["max_len_a"],
            "max_len_b": decode["max_len_b"],
            "inputs": "source_ids: the source's ids from tokenizer.json, then eos_id, padded with pad_id",
            "outputs": "greedy: run the encoder once; start with token_ids [[bos_id]] and past keys and values with 0 positions "
            "(layers, B, heads, 0, d_model / heads); each step's argmax is the next token and its present keys and "
            "values the next past, until eos_id or max_len_a * source length + max_len_b tokens",
        }

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        if not text.strip():
            raise UsageError("the input text is empty")
        device = next(model.parameters()).device
        (source,) = self._source_ids([text])
        src = torch.tensor([source], device=device)
        model.eval()
        (output,) = greedy_search(
            model, src, BOS, EOS, int(self.config["decode"]["max_len_a"] * len(source) + self.config["decode"]["max_len_b"])
        )
        target = [BOS, *output]  # decoder inputs: each position predicts the next token
        tgt = torch.tensor([target], device=device)

        def axes(name: str) -> tuple[str, str]:
            if name.startswith("encoder."):
                return "source", "source"
            return ("target", "source") if name.endswith("cross_attn") else ("target", "target")

        tokens = {
            "source": [self.tokenizer.id_to_token(i) for i in source],
            "target": [self.tokenizer.id_to_token(i) for i in target],
        }
        predicted = [self.tokenizer.id_to_token(i) for i in [*output, EOS]]  # what each decoder position predicts

        def page(weights: dict) -> dict:
            cross = [name for name in weights if name.endswith("cross_attn")]
            return {
                "panels": [
                    {
                        "kind": "alignment",
                        "title": "source × target alignment (cross-attention)",
                        "modules": cross,
                        "rows": predicted,
                    }
                ]
            }

        return AttentionExample(run=lambda: model(src, tgt), tokens=tokens, axes=axes, page=page)
