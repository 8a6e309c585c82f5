"""BERT (Devlin et al., 2019): masked-LM + next-sentence pretraining, and fine-tuning.

The encoder is the shared post-LN block stack with GELU, under token + segment + learned position
embeddings. Pretraining sees ``[CLS] A [SEP] B [SEP]``: B follows A half the time, and 15% of the
ordinary tokens are chosen for prediction (80% become [MASK], 10% a random token, 10% stay); the MLM
logits are computed only at the chosen positions, through the token embedding matrix.

Fine-tuning puts a linear head on the pooled [CLS] vector (classify, classify-pair) or on every token
(tag, and qa, whose two outputs are the start and end logits of the answer). qa reads a long context
in windows that overlap by ``doc_stride`` tokens and answers with the best span over all of them.

The built-in corpus is English prose every Python carries: the docstrings of the standard library
(read with ``ast``, never imported) and the language reference in ``pydoc_data.topics``.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re
import string
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple, TextIO

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import Tensor, nn

from tfkit import run as runs
from tfkit.data import (
    SPLITS, cached, encode_once, label_names, length_buckets, load_splits, pad_rows, read_lines, require_columns, train_wordpiece,
)
from tfkit.errors import UsageError
from tfkit.inspect import draw_heads
from tfkit.nn.blocks import Encoder
from tfkit.nn.dropout import Dropout
from tfkit.nn.embeddings import TokenEmbedding
from tfkit.recipe import AttentionExample, Batch, Loss, Recipe, batch_ranges
from tfkit.registry import register

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
IS_NEXT, NOT_NEXT = 0, 1  # the Hugging Face convention for NSP labels
TOKEN_COLUMNS = datasets.Features({"ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32")})
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "pydoc_data"}
CLASSIFY_PACKAGES = ["asyncio", "email", "tkinter", "unittest", "xml"]  # the built-in classify labels


# -- the built-in corpus ----------------------------------------------------------------------------
def sentences(text: str) -> list[str]:
    """Prose sentences of a docstring: code, doctests and indented blocks are dropped."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(line.strip() for line in lines)):
            words = sentence.split()
            letters = sum(c.isalpha() for c in sentence)
            if 4 <= len(words) <= 50 and letters >= 0.7 * len(sentence.replace(" ", "")):
                out.append(sentence)
    return out


@functools.cache  # every built-in corpus starts here, and parsing the library takes seconds
def stdlib_documents() -> list[tuple[str, list[str]]]:
    """(package, sentences) for every docstring of the standard library with two or more sentences,
    in a fixed order, then one document per language-reference topic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIPPED_PACKAGES & set(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        package = parts[0].removesuffix(".py")
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
        for node in nodes:
            found = sentences(ast.get_docstring(node) or "")
            if len(found) >= 2:
                documents.append((package, found))
    from pydoc_data.topics import topics

    for name in sorted(topics):
        found = sentences(topics[name])
        if len(found) >= 2:
            documents.append(("reference", found))
    return documents


def pretraining_corpus(seed: int) -> datasets.DatasetDict:
    """Rows of sentences with a blank row between documents (the text-file layout); documents are
    split 90/5/5 by seed."""

    def build() -> datasets.DatasetDict:
        documents = [doc for _, doc in stdlib_documents()]
        random.Random(seed).shuffle(documents)
        cut = len(documents) // 20
        parts = {"validation": documents[:cut], "test": documents[cut : 2 * cut], "train": documents[2 * cut :]}
        return datasets.DatasetDict(
            {split: datasets.Dataset.from_dict({"text": [s for doc in docs for s in [*doc, ""]]}) for split, docs in parts.items()}
        )

    return cached("stdlib-prose", {"seed": seed, "python": sys.version.split()[0]}, build)


def classify_corpus(seed: int) -> datasets.DatasetDict:
    """Which part of the standard library a docstring sentence comes from: a balanced, stratified
    70/10/20 split over CLASSIFY_PACKAGES."""

    def build() -> datasets.DatasetDict:
        by_package: dict[str, list[str]] = {p: [] for p in CLASSIFY_PACKAGES}
        for package, doc in stdlib_documents():
            if package in by_package:
                by_package[package] += doc
        smallest = min(len(s) for s in by_package.values())
        rng = random.Random(seed)
        texts, labels = [], []
        for label, package in enumerate(CLASSIFY_PACKAGES):
            chosen = rng.sample(sorted(set(by_package[package])), min(smallest, len(set(by_package[package]))))
            texts += chosen
            labels += [label] * len(chosen)
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSIFY_PACKAGES)})
        full = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        rest, test = full.train_test_split(test_size=0.2, stratify_by_column="label", seed=seed).values()
        train, validation = rest.train_test_split(test_size=0.125, stratify_by_column="label", seed=seed).values()
        return datasets.DatasetDict({"train": train, "validation": validation, "test": test})

    return cached("stdlib-classify", {"seed": seed, "python": sys.version.split()[0]}, build)


def sentence_rows(rows: datasets.Dataset, column: str, split: str) -> datasets.Dataset:
    """The sentences of a split as rows of ``text`` and ``first`` (the first sentence of a document),
    in an Arrow table (memory-mapped when ``rows`` come from files). Blank rows separate documents;
    without any blank row, each row is a document of sentences."""
    require_columns(rows, split, [column], "data.text_column")
    kind = getattr(rows.features[column], "dtype", type(rows.features[column]).__name__)
    if kind not in ("string", "large_string"):
        raise UsageError(f"the {split} data's column '{column}' holds {kind}, not text (set data.text_column)")
    blank_rows = any(  # read in blocks: a corpus need not fit in memory
        pc.any(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(block[column]), ""), True)).as_py()
        for block in rows.with_format("arrow").iter(batch_size=100_000)
    )

    def split_rows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"text": [], "first": []}
        after_blank = indices[0] == 0 or not (rows[indices[0] - 1][column] or "").strip()
        for text in batch[column]:
            text = (text or "").strip()
            if blank_rows:
                if text:
                    out["text"].append(text)
                    out["first"].append(after_blank)
                after_blank = not text
            else:
                found = sentences(text) or [text]
                out["text"] += found
                out["first"] += [True] + [False] * (len(found) - 1)
        return out

    columns = datasets.Features({"text": datasets.Value("string"), "first": datasets.Value("bool")})
    return encode_once(rows, split_rows, {"column": column, "blank_rows": blank_rows}, columns)


class TableText:
    """The sentences of some documents of a :func:`sentence_rows` table, read a block at a time on
    every iteration (training WordPiece reads them twice)."""

    def __init__(self, table: datasets.Dataset, documents: np.ndarray):
        edges = np.zeros(len(table) + 1, dtype=np.int64)
        np.add.at(edges, documents[:, 0], 1)
        np.add.at(edges, documents[:, 1], -1)
        self.table, self.chosen = table, np.cumsum(edges)[:-1] > 0

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.table), 10_000):
            texts = self.table[start : start + 10_000]["text"]
            yield from (text for text, chosen in zip(texts, self.chosen[start : start + 10_000]) if chosen)


def document_bounds(table: datasets.Dataset) -> np.ndarray:
    """(documents, 2): the [start, end) sentence rows of each document of a :func:`sentence_rows` table."""
    starts = np.flatnonzero(table.data.column("first").to_numpy(zero_copy_only=False))
    return np.stack([starts, np.append(starts[1:], len(table))], axis=1)


# -- the model --------------------------------------------------------------------------------------
class Bert(nn.Module):
    """BERT's encoder: embeddings, a stack of blocks, and the tanh pooler over [CLS]."""

    def __init__(self, vocab_size: int, d_model: int, heads: int, d_ff: int, layers: int, dropout: float,
                 activation: str, block: str, max_positions: int, norm_eps: float):
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, d_model, max_positions, 2, dropout, PAD)
        self.encoder = Encoder(block, layers, d_model, heads, d_ff, dropout, activation)
        self.pooler = nn.Linear(d_model, d_model)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = norm_eps

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids → hidden states (B, T, D) and pooled [CLS] (B, D)."""
        mask = (token_ids != PAD)[:, None, None, :]
        hidden = self.encoder(self.embed(token_ids, segment_ids), mask)
        return hidden, torch.tanh(self.pooler(hidden[:, 0]))


def init_bert_weights(model: nn.Module, norm_eps: float) -> None:
    """N(0, 0.02) for every matrix and embedding, zero biases (Devlin et al.)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.eps = norm_eps
    for module in model.modules():
        if isinstance(module, TokenEmbedding):
            nn.init.normal_(module.position.table, std=0.02)
            with torch.no_grad():
                module.tokens.weight[PAD].zero_()


def build_bert(vocab_size: int, config: dict[str, Any]) -> Bert:
    m, longest = config["model"], config["data"]["max_length"]
    if longest > m["max_positions"]:
        raise UsageError(f"data.max_length {longest} is more than the model's {m['max_positions']} positions "
                         f"(model.max_positions; a pretrained model fixes it)")
    return Bert(vocab_size, m["d_model"], m["heads"], m["d_ff"], m["layers"], m["dropout"], m["activation"], m["block"],
                m["max_positions"], m["norm_eps"])


class BertForPretraining(nn.Module):
    """BERT with the masked-LM head (output matrix tied to the token embeddings) and the NSP head."""

    def __init__(self, bert: Bert, norm_eps: float):
        super().__init__()
        d_model, vocab_size = bert.pooler.in_features, bert.embed.tokens.num_embeddings
        self.bert = bert
        self.mlm_transform = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.nsp = nn.Linear(d_model, 2)
        init_bert_weights(self, norm_eps)

    def forward(self, token_ids: Tensor, segment_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions`` index the flattened (B·T) tokens to predict → MLM logits (P, V), NSP logits (B, 2)."""
        hidden, pooled = self.bert(token_ids, segment_ids)
        chosen = self.mlm_transform(hidden.flatten(0, 1)[positions])
        return F.linear(chosen, self.bert.embed.tokens.weight, self.mlm_bias), self.nsp(pooled)


# -- masking and pairs ------------------------------------------------------------------------------
def mask_tokens(
    token_ids: Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose round(prob·n) of each row's n ordinary tokens (at least one); of those, 80% become [MASK],
    10% a random ordinary token, 10% stay. Returns (masked ids, flat positions, original ids there)."""
    ordinary = token_ids >= len(SPECIALS)
    counts = (ordinary.sum(1).float() * prob).round().clamp(min=1).long()
    scores = torch.rand(token_ids.shape, generator=generator).masked_fill(~ordinary, 2.0)  # specials sort last
    ranks = scores.argsort(1).argsort(1)
    chosen = (ranks < counts[:, None]) & ordinary
    positions = chosen.flatten().nonzero().squeeze(1)
    labels = token_ids.flatten()[positions]
    action = torch.rand(len(positions), generator=generator)
    replacement = torch.where(
        action < 0.8,
        torch.full_like(labels, MASK),
        torch.where(action < 0.9, torch.randint(len(SPECIALS), vocab_size, labels.shape, generator=generator), labels),
    )
    masked = token_ids.flatten().clone()
    masked[positions] = replacement
    return masked.view_as(token_ids), positions, labels


def nsp_pairs(documents: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each sentence with a successor in its document: sentence numbers A and B and the label, with
    B the true next sentence half the time, otherwise a random sentence of another document.
    ``documents`` holds each document's [start, end) sentence numbers."""
    starts, sizes = documents[:, 0], documents[:, 1] - documents[:, 0]
    per_document = np.maximum(sizes - 1, 0)
    document = np.repeat(np.arange(len(documents)), per_document)
    first_pair = np.cumsum(per_document) - per_document
    a = starts[document] + np.arange(len(document)) - first_pair[document]
    b, label = a + 1, np.full(len(a), IS_NEXT)
    if len(documents) >= 2:
        swapped = rng.random(len(a)) >= 0.5
        other = rng.integers(0, len(documents) - 1, int(swapped.sum()))
        other += other >= document[swapped]  # any document but this one
        b[swapped] = starts[other] + rng.integers(0, sizes[other])
        label[swapped] = NOT_NEXT
    return a, b, label


def pair_ids(
    a: list[int], b: list[int] | None, max_length: int, cls: int = CLS, sep: int = SEP
) -> tuple[list[int], list[int]]:
    """[CLS] A [SEP] (B [SEP]) and segment ids, cutting tokens off the end of the longer side."""
    a, b = list(a), (list(b) if b is not None else None)
    budget = max_length - (3 if b is not None else 2)
    while len(a) + (len(b) if b else 0) > budget:
        (a if b is None or len(a) >= len(b) else b).pop()
    ids = [cls, *a, sep] + ([*b, sep] if b is not None else [])
    return ids, [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)


def load_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json, or a BERT vocab.txt (uncased WordPiece) as Hugging Face folders carry."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.txt").is_file():
        tokenizer = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer
    raise UsageError(f"{folder} has no tokenizer.json or vocab.txt")


def check_specials(tokenizer: Tokenizer, where: Path | str) -> None:
    missing = [t for t in SPECIALS if tokenizer.token_to_id(t) is None]
    if missing or tokenizer.token_to_id("[PAD]") != PAD:
        raise UsageError(f"the tokenizer of {where} lacks {', '.join(missing) or '[PAD]'} at the ids tfkit's BERT expects")


# -- pretraining ------------------------------------------------------------------------------------
class BertRecipe(Recipe):
    """What both BERT recipes share: the tokenizer in the run directory and encoding text pairs."""

    tokenizer: Tokenizer

    def save(self, run_dir: Path) -> None:
        runs.write_tokenizer(run_dir, self.tokenizer)

    def load(self, run_dir: Path) -> None:
        self.tokenizer = runs.read_tokenizer(run_dir)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, a: str, b: str | None = None) -> tuple[list[int], list[int]]:
        (first,) = self.token_ids([a])
        second = self.token_ids([b])[0] if b is not None else None
        cls, sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        return pair_ids(first, second, self.config["data"]["max_length"], cls, sep)

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        """A sentence, or two separated by a tab or ' ||| ', as BERT sees them."""
        parts = re.split(r"\t| \|\|\| ", text.strip(), maxsplit=1)
        if not parts[0]:
            raise UsageError("the input text is empty")
        ids, segments = self.encode(parts[0], parts[1] if len(parts) > 1 else None)
        device = next(model.parameters()).device
        token_ids = torch.tensor([ids], device=device)
        segment_ids = torch.tensor([segments], device=device)
        tokens = [self.tokenizer.id_to_token(i) for i in ids]
        boundary = segments.index(1) if 1 in segments else None
        model.eval()

        def draw(weights: dict, out_dir: Path) -> None:
            for name, w in weights.items():
                draw_heads(w, tokens, tokens, name, out_dir / f"{name}.png", boundary=boundary)

        return AttentionExample(
            run=lambda: model.bert(token_ids, segment_ids),
            tokens={"tokens": tokens},
            axes=lambda name: ("tokens", "tokens"),
            draw=draw,
            meta={"segments": segments},
        )


@register("recipe", "bert-pretrain")
class BertPretrain(BertRecipe):
    """BERT pretraining: masked LM (15%, 80/10/10) and next-sentence prediction, WordPiece."""

    config_file = "bert-pretrain.yaml"

    def prepare(self, run_dir: Path | None = None) -> None:
        """Sentences and their token ids live in Arrow tables (memory-mapped when read from files);
        memory holds sentence lengths, document bounds and the held-out batches."""
        data, seed = self.config["data"], self.config["seed"]
        splits = load_splits(data["name"], lambda: pretraining_corpus(seed), seed, hub_config=data["hub_config"], carve=False)
        texts = {split: sentence_rows(rows, data["text_column"], split) for split, rows in splits.items()}
        self.documents = {split: document_bounds(table) for split, table in texts.items()}
        for split in self._carve(seed):
            texts[split] = texts["train"]
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.tokenizer = train_wordpiece(TableText(texts["train"], self.documents["train"]), data["vocab_size"], SPECIALS)
        self.ids, self.lengths = {}, {}
        encoded: dict[int, datasets.Dataset] = {}  # carved splits share the training table
        for split, table in texts.items():
            if id(table) not in encoded:
                encoded[id(table)] = encode_once(table, self._encode, {"tokenizer": self.tokenizer.to_str()}, TOKEN_COLUMNS)
            self.ids[split] = encoded[id(table)]
            self.lengths[split] = self.ids[split].data.column("length").to_numpy()
        # held-out pairs and masks are drawn once, so every evaluation scores the same questions
        self.held_out = {split: list(self._batches(split, seed + 7919, shuffle=False)) for split in ("validation", "test")}

    def _encode(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        ids = self.token_ids(batch["text"])
        return {"ids": ids, "length": [len(row) for row in ids]}

    def _carve(self, seed: int) -> list[str]:
        """Documents of the training split held out as the validation and test splits the source
        lacks; returns the names of the splits carved."""
        train = self.documents["train"]
        if ((train[:, 1] - train[:, 0]) >= 2).sum() < 3:
            raise UsageError("the training text needs documents of two or more sentences (blank lines between documents)")
        missing = [s for s in ("validation", "test") if s not in self.documents]
        if missing:
            order = np.random.default_rng(seed).permutation(len(train))
            size = max(1, round(self.config["data"]["held_out"] * len(train)))
            for i, split in enumerate(missing):
                self.documents[split] = train[np.sort(order[i * size : (i + 1) * size])]
            self.documents["train"] = train[np.sort(order[len(missing) * size :])]
        return missing

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return BertForPretraining(build_bert(self.tokenizer.get_vocab_size(), self.config), m["norm_eps"])

    def _batches(self, split: str, seed: int, shuffle: bool = True) -> Iterator[Batch]:
        """Sentence-pair batches of ``split`` with their masks, drawn from ``seed``; with ``shuffle``,
        pairs of similar length share a batch (less padding) and batches come in random order."""
        cfg = self.config
        generator = torch.Generator().manual_seed(seed)
        a, b, labels = nsp_pairs(self.documents[split], np.random.default_rng(seed))
        size, vocab, max_length = cfg["train"]["batch_size"], self.tokenizer.get_vocab_size(), cfg["data"]["max_length"]
        if shuffle:
            lengths = self.lengths[split]
            chunks = length_buckets(lengths[a] + lengths[b], size, generator, pool=50)
        else:
            chunks = [range(start, min(start + size, len(a))) for start in range(0, len(a), size)]
        table = self.ids[split]
        for chunk in chunks:
            pairs = list(chunk)
            rows = table[[*a[pairs].tolist(), *b[pairs].tolist()]]["ids"]
            encoded = [pair_ids(first, second, max_length) for first, second in zip(rows[: len(pairs)], rows[len(pairs) :])]
            token_ids = pad_rows([ids for ids, _ in encoded], PAD)
            masked, positions, mlm_labels = mask_tokens(token_ids, vocab, generator, cfg["data"]["mask_prob"])
            yield {
                "token_ids": masked,
                "segment_ids": pad_rows([seg for _, seg in encoded], 0),
                "positions": positions,
                "mlm_labels": mlm_labels,
                "nsp_labels": torch.from_numpy(labels[pairs]),
            }

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        # new pairs and new masks every epoch (dynamic masking), fixed by seed and epoch
        yield from self._batches("train", self.config["seed"] * 1_000_003 + epoch)

    def shard(self, batch: Batch, rank: int, world: int) -> Batch:
        """Rows as usual; the masked positions (flat over B·T) and their labels follow their rows."""
        rows, length = len(batch["token_ids"]), batch["token_ids"].size(1)
        bounds = torch.arange(rows).tensor_split(world)[rank]
        first, end = (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (0, 0)
        keep = (batch["positions"] >= first * length) & (batch["positions"] < end * length)
        return {
            **super().shard({k: batch[k] for k in ("token_ids", "segment_ids", "nsp_labels")}, rank, world),
            "positions": batch["positions"][keep] - first * length,
            "mlm_labels": batch["mlm_labels"][keep],
        }

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        """The mean MLM loss over masked tokens plus the mean NSP loss over pairs."""
        mlm_logits, nsp_logits = model(batch["token_ids"], batch["segment_ids"], batch["positions"])
        mlm = F.cross_entropy(mlm_logits.float(), batch["mlm_labels"], reduction="sum")
        nsp = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"], reduction="sum")
        return Loss([(mlm, len(mlm_logits)), (nsp, len(nsp_logits))], int((batch["token_ids"] != PAD).sum()))

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1) -> dict[int, tuple[float, int, int, int, int]]:
        """Per held-out batch: MLM loss summed, MLM right and total, NSP right and total."""
        model.eval()
        device = next(model.parameters()).device
        batches, out = self.held_out[split], {}
        for number in range(rank, len(batches), world):
            batch = {k: v.to(device) for k, v in batches[number].items()}
            mlm_logits, nsp_logits = model(batch["token_ids"], batch["segment_ids"], batch["positions"])
            out[number] = (
                F.cross_entropy(mlm_logits.float(), batch["mlm_labels"], reduction="sum").item(),
                int((mlm_logits.argmax(-1) == batch["mlm_labels"]).sum()),
                len(batch["mlm_labels"]),
                int((nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()),
                len(batch["nsp_labels"]),
            )
        return out

    def score(self, split: str, outputs: list[tuple[float, int, int, int, int]]) -> dict[str, float]:
        mlm_loss, mlm_correct, mlm_total, nsp_correct, nsp_total = (sum(column) for column in zip(*outputs)) if outputs else (0,) * 5
        return {
            "mlm_accuracy": 100.0 * mlm_correct / max(1, mlm_total),
            "mlm_loss": mlm_loss / max(1, mlm_total),
            "nsp_accuracy": 100.0 * nsp_correct / max(1, nsp_total),
        }

    @torch.no_grad()
    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None = None) -> None:
        """For each line with [MASK] (a pair separated by a tab): the top-k fillings of each mask as
        tab-separated "token probability" fields, masks separated by a "|" field."""
        top_k = top_k or self.config["predict"]["top_k"]
        model.eval()
        device = next(model.parameters()).device
        for number, line in enumerate(read_lines(path), 1):
            parts = line.split("\t", 1)
            ids, segments = self.encode(parts[0], parts[1] if len(parts) > 1 else None)
            positions = [i for i, t in enumerate(ids) if t == MASK]
            if not positions:
                print(f"warning: {path}:{number}: no [MASK] in the line, its output is left empty", file=sys.stderr)
                out.write("\n")
                continue
            mlm_logits, _ = model(torch.tensor([ids], device=device), torch.tensor([segments], device=device), torch.tensor(positions, device=device))
            probs, tokens = mlm_logits.float().softmax(-1).topk(top_k, dim=-1)
            fillings = [
                "\t".join(f"{self.tokenizer.id_to_token(t)} {p:.3f}" for p, t in zip(row_p.tolist(), row_t.tolist()))
                for row_p, row_t in zip(probs, tokens)
            ]
            out.write("\t|\t".join(fillings) + "\n")


# -- weights from elsewhere -------------------------------------------------------------------------
def bert_config_from_hf(folder: Path) -> dict[str, Any]:
    """model.* overrides for a transformers BERT folder's config.json."""
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} could not be read ({type(e).__name__})") from None
    if hf.get("model_type") != "bert":
        raise UsageError(f"{path} describes a '{hf.get('model_type')}' model, not BERT")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise UsageError(f"{folder}: only BERTs with GELU and absolute positions can be imported")
    return {
        "d_model": hf["hidden_size"], "heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
        "layers": hf["num_hidden_layers"], "activation": "gelu", "block": "post_ln",
        "max_positions": hf["max_position_embeddings"], "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
    }


def bert_weights_from_hf(folder: Path, layers: int) -> dict[str, Tensor]:
    """A transformers BERT checkpoint (BertModel or Bert*For*, safetensors) renamed to :class:`Bert`'s
    names; query, key and value fuse into one projection."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"{folder} has no model.safetensors (only safetensors weights are loaded)")
    hf = {}
    for key, value in load_file(str(path)).items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        hf[key] = value
    try:
        ours = {
            "embed.tokens.weight": hf["embeddings.word_embeddings.weight"],
            "embed.segments.weight": hf["embeddings.token_type_embeddings.weight"],
            "embed.position.table": hf["embeddings.position_embeddings.weight"],
            "embed.norm.weight": hf["embeddings.LayerNorm.weight"],
            "embed.norm.bias": hf["embeddings.LayerNorm.bias"],
            "pooler.weight": hf["pooler.dense.weight"],
            "pooler.bias": hf["pooler.dense.bias"],
        }
        for i in range(layers):
            theirs, mine = f"encoder.layer.{i}.", f"encoder.layers.{i}."
            for part in ("weight", "bias"):
                qkv = [hf[f"{theirs}attention.self.{p}.{part}"] for p in ("query", "key", "value")]
                ours[f"{mine}self_attn.in_proj.{part}"] = torch.cat(qkv)
                ours[f"{mine}self_attn.out_proj.{part}"] = hf[f"{theirs}attention.output.dense.{part}"]
                ours[f"{mine}norm1.{part}"] = hf[f"{theirs}attention.output.LayerNorm.{part}"]
                ours[f"{mine}feed_forward.up.{part}"] = hf[f"{theirs}intermediate.dense.{part}"]
                ours[f"{mine}feed_forward.down.{part}"] = hf[f"{theirs}output.dense.{part}"]
                ours[f"{mine}norm2.{part}"] = hf[f"{theirs}output.LayerNorm.{part}"]
    except KeyError as e:
        raise UsageError(f"{path} is not a transformers BERT checkpoint (no tensor {e})") from None
    return ours


# -- fine-tuning ------------------------------------------------------------------------------------
IGNORE = -100  # label of the positions a tagger is not scored on: specials and non-first sub-tokens


def word_tag(word: str) -> str:
    """The built-in tagging scheme for docstring prose: constants, exception classes and calls."""
    bare = word.strip(".,;:!?'\"`()[]")
    if bare in ("True", "False", "None"):
        return "B-CONST"
    if re.fullmatch(r"[A-Z]\w*(Error|Exception|Warning)", bare):
        return "B-EXC"
    if re.fullmatch(r"[A-Za-z_][\w.]*\(\)[.,;:]?", word.strip("`")):
        return "B-CALL"
    return "O"


def tag_corpus(seed: int) -> datasets.DatasetDict:
    """Docstring sentences tagged word by word (BIO) with word_tag; sentences with at least one
    entity, split 70/10/20 by seed."""

    def build() -> datasets.DatasetDict:
        rows = {"tokens": [], "tags": []}
        for _, document in stdlib_documents():
            for sentence in document:
                words = sentence.split()
                tags = [word_tag(w) for w in words]
                if any(t != "O" for t in tags):
                    rows["tokens"].append(words)
                    rows["tags"].append(tags)
        full = datasets.Dataset.from_dict(rows)
        rest, test = full.train_test_split(test_size=0.2, seed=seed).values()
        train, validation = rest.train_test_split(test_size=0.125, seed=seed).values()
        return datasets.DatasetDict({"train": train, "validation": validation, "test": test})

    return cached("stdlib-tags", {"seed": seed, "python": sys.version.split()[0]}, build)


def entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans of a BIO sequence; an I- without its B- starts a span, as conlleval does."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        if start is not None and (prefix != "I" or label != kind):
            spans.add((start, i, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, label
    return spans


def pair_corpus(seed: int) -> datasets.DatasetDict:
    """Paraphrase identification on the classify corpus's sentences (like MRPC): half the pairs are a
    sentence and a lightly edited copy (one word dropped, two neighbours swapped), half a sentence
    and another one from the same part of the standard library; four pairs per training sentence."""
    rng = random.Random(seed)
    out = {}
    for split, rows in classify_corpus(seed).items():
        by_label: dict[int, list[str]] = {}
        for text, label in zip(rows["text"][:], rows["label"][:]):
            by_label.setdefault(label, []).append(text)
        texts, pairs, labels = [], [], []
        repeats = 4 if split == "train" else 1  # several edits and partners per training sentence
        for text, label in [row for row in zip(rows["text"][:], rows["label"][:]) for _ in range(repeats)]:
            if rng.random() < 0.5:
                words = text.split()
                del words[rng.randrange(len(words))]
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
                pairs.append(" ".join(words))
                labels.append(0)
            else:
                pairs.append(rng.choice([t for t in by_label[label] if t != text]))
                labels.append(1)
            texts.append(text)
        features = datasets.Features(
            {"text": datasets.Value("string"), "text_pair": datasets.Value("string"),
             "label": datasets.ClassLabel(names=["paraphrase", "different"])}
        )
        out[split] = datasets.Dataset.from_dict({"text": texts, "text_pair": pairs, "label": labels}, features=features)
    return datasets.DatasetDict(out)


# -- question answering -----------------------------------------------------------------------------
class Question(NamedTuple):
    """One question about a context, with its gold answers."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, first character in the context); none when predicting


WH_PHRASES = {"B-EXC": "which exception", "B-CONST": "which constant", "B-CALL": "which function"}


def passages(document: list[str], words: int = 150) -> list[list[str]]:
    """Runs of a document's consecutive sentences of at most ``words`` words (SQuAD's paragraphs
    average about 120)."""
    out, current, count = [], [], 0
    for sentence in document:
        if current and count + len(sentence.split()) > words:
            out.append(current)
            current, count = [], 0
        current.append(sentence)
        count += len(sentence.split())
    return out + [current] if current else out


def docstring_questions(passage: list[str]) -> Iterator[tuple[str, str, int]]:
    """(question, answer, answer start) about a passage, whose context is its sentences joined by
    spaces: each entity of word_tag in a sentence of 25 words or fewer, asked for by the sentence with
    the entity replaced by its wh-phrase; and, when exactly one sentence reads "Return(s) X." without
    entities, "What does it return?" with X (2 to 12 words) as the answer."""
    returns = [s for s in passage if re.match(r"Returns? ", s)]
    offset = 0
    for sentence in passage:
        if len(sentence.split()) <= 25:  # the question is the sentence: it must leave room for context
            for word in re.finditer(r"\S+", sentence):
                kind = word_tag(word.group())
                if kind == "O":
                    continue
                entity = re.search(r"[A-Za-z_][\w.]*\(\)" if kind == "B-CALL" else r"\w+", word.group())
                at = word.start() + entity.start()
                asked = (sentence[:at] + WH_PHRASES[kind] + sentence[at + len(entity.group()) :]).rstrip(".!?") + "?"
                yield asked[0].upper() + asked[1:], entity.group(), offset + at
        returned = re.fullmatch(r"(Returns? )(.+)\.", sentence)
        if returned and len(returns) == 1 and 2 <= len(returned[2].split()) <= 12 and all(word_tag(w) == "O" for w in sentence.split()):
            yield "What does it return?", returned[2], offset + len(returned[1])
        offset += len(sentence) + 1


def qa_corpus(seed: int) -> datasets.DatasetDict:
    """Questions about docstring passages in the layout of Hugging Face's ``squad`` (a question turned
    from a cloze sentence, as in Lewis et al., 2019; see docstring_questions); passages without a
    question are left out, documents split 80/10/10 by seed."""

    def build() -> datasets.DatasetDict:
        documents = list(dict.fromkeys(tuple(doc) for _, doc in stdlib_documents()))  # some docstrings repeat verbatim
        random.Random(seed).shuffle(documents)
        cut = len(documents) // 10
        parts = {"validation": documents[:cut], "test": documents[cut : 2 * cut], "train": documents[2 * cut :]}
        out = {}
        for split, docs in parts.items():
            rows = []
            for passage in (p for doc in docs for p in passages(list(doc))):
                for question, answer, start in docstring_questions(passage):
                    rows.append({"id": f"{split}-{len(rows)}", "question": question, "context": " ".join(passage),
                                 "answers": {"text": [answer], "answer_start": [start]}})
            out[split] = datasets.Dataset.from_list(rows)
        return datasets.DatasetDict(out)

    return cached("stdlib-qa", {"seed": seed, "python": sys.version.split()[0]}, build)


def checked_question(where: str, qid: str, question: Any, context: Any, answers: list[tuple[Any, Any]] | None) -> Question:
    """A question whose answers are all their context's text at their start; else an error naming
    ``where``. ``answers=None`` (predicting) asks for none."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError(f"{where} has no question")
    if not isinstance(context, str) or not context.strip():
        raise UsageError(f"{where} has no context")
    if answers is not None and not answers:
        raise UsageError(f"{where} has no answer (unanswerable questions, as in SQuAD 2.0, are not supported)")
    for text, start in answers or []:
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{where} has an empty answer text")
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= len(context) - len(text):
            raise UsageError(f"{where}: answer_start {start!r} does not fit the answer {text!r} in its context of {len(context)} characters")
        if context[start : start + len(text)] != text:
            raise UsageError(f"{where}: the answer {text!r} is not the context's text at {start} ({context[start : start + len(text)]!r})")
    return Question(qid, question, context, answers or [])


def read_squad(path: Path, answers: bool = True) -> list[Question] | None:
    """The questions of a SQuAD v1.1 file, {"data": [{"paragraphs": [{"context", "qas": [{"id",
    "question", "answers": [{"text", "answer_start"}]}]}]}]}; None when the file is not one JSON
    object (JSON lines are rows). A malformed entry is an error naming the file and the entry;
    ``answers=False`` (predicting) reads no answers."""
    try:
        top = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(top, dict):
        return None

    kinds = {list: "a list", str: "a string", int: "an integer"}

    def field(entry: Any, key: str, kind: type, where: str) -> Any:
        value = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"{path}: {where} lacks '{key}' ({kinds[kind]})")
        return value

    out = []
    for a, article in enumerate(field(top, "data", list, "the top level")):
        for p, paragraph in enumerate(field(article, "paragraphs", list, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = field(paragraph, "context", str, where)
            for q, qa in enumerate(field(paragraph, "qas", list, where)):
                qid = str(qa.get("id", "")) if isinstance(qa, dict) else ""
                entry = f"{where}.qas[{q}]" + (f" (id {qid})" if qid else "")
                given = None
                if answers:
                    given = [(field(x, "text", str, f"{entry}.answers[{k}]"), field(x, "answer_start", int, f"{entry}.answers[{k}]"))
                             for k, x in enumerate(field(qa, "answers", list, entry))]
                out.append(checked_question(f"{path}: {entry}", qid, field(qa, "question", str, entry), context, given))
    return out


def carve_by_context(questions: dict[str, list[Question]], seed: int, held_out: float = 0.05) -> dict[str, list[Question]]:
    """The validation and test splits a source lacks, carved from its training questions a
    ``held_out`` share of the contexts each: unlike rows carved by load_splits, no held-out question
    is then about a context trained on."""
    train, missing = questions["train"], [split for split in SPLITS if split not in questions]
    if not missing:
        return questions
    contexts = list(dict.fromkeys(q.context for q in train))
    random.Random(seed).shuffle(contexts)
    size = max(1, round(held_out * len(contexts)))
    if len(contexts) <= size * len(missing):
        raise UsageError(f"the dataset has too few contexts ({len(contexts)}) to hold out {' and '.join(missing)} questions")
    out = dict(questions)
    for i, split in enumerate(missing):
        chosen = set(contexts[i * size : (i + 1) * size])
        out[split] = [q for q in train if q.context in chosen]
    kept = set(contexts[len(missing) * size :])
    out["train"] = [q for q in train if q.context in kept]
    return out


class Window(NamedTuple):
    """``[CLS] question [SEP] context tokens [SEP]`` for question number ``question``."""

    ids: list[int]
    segments: list[int]
    start: int  # the answer's first and last token, both 0 ([CLS]) where the window lacks the answer
    end: int
    question: int
    context_start: int  # position of the first context token
    spans: list[tuple[int, int]]  # each context token's characters [start, end) in the context


def windows(question: list[int], context: list[int], offsets: list[tuple[int, int]], answer: tuple[int, int] | None,
            max_length: int, stride: int, number: int = 0, cls: int = CLS, sep: int = SEP) -> list[Window]:
    """Windows over a context's tokens that overlap by ``stride`` tokens (HF run_qa's doc_stride),
    each beside the question; ``answer`` is the characters [start, end) of the context to label."""
    question = question[: max_length // 2]  # a long question still leaves half of each window to the context
    room = max_length - len(question) - 3
    if stride >= room:
        raise UsageError(f"data.doc_stride {stride} must be smaller than the {room} context tokens that fit beside a "
                         f"question of {len(question)} tokens in data.max_length {max_length}")
    inside = [i for i, (start, end) in enumerate(offsets) if answer is not None and start < answer[1] and end > answer[0]]
    first = len(question) + 2
    out, begin = [], 0
    while True:
        end = min(begin + room, len(context))
        holds = bool(inside) and begin <= inside[0] and inside[-1] < end
        labels = (first + inside[0] - begin, first + inside[-1] - begin) if holds else (0, 0)
        ids = [cls, *question, sep, *context[begin:end], sep]
        out.append(Window(ids, [0] * first + [1] * (len(ids) - first), *labels, number, first, offsets[begin:end]))
        if end == len(context):
            return out
        begin += room - stride


def window_answer(window: Window, scores: Tensor, max_answer_length: int) -> tuple[float, int, int]:
    """A window's best answer: the span of context tokens with the highest start + end logit, end ≥
    start, at most ``max_answer_length`` tokens, as (score, first character, end character).
    ``scores`` holds the window's (positions, 2) start and end logits."""
    n = len(window.spans)
    context = scores[window.context_start : window.context_start + n]
    pairs = context[:, None, 0] + context[None, :, 1]  # [i, j]: the span from token i to token j
    legal = torch.ones(n, n, dtype=torch.bool).triu().tril(max_answer_length - 1)
    score, flat = pairs.masked_fill(~legal, float("-inf")).flatten().max(0)
    i, j = divmod(int(flat), n)
    return score.item(), window.spans[i][0], window.spans[j][1]


def best_answers(windows: list[Window], candidates: list[tuple[float, int, int]]) -> dict[int, tuple[int, int]]:
    """Each question's answer as characters [start, end) of its context: the best of its windows'
    answers (``candidates``, one per window, from :func:`window_answer`)."""
    best: dict[int, tuple[float, int, int]] = {}
    for window, candidate in zip(windows, candidates):
        if window.question not in best or candidate[0] > best[window.question][0]:
            best[window.question] = candidate
    return {question: (start, end) for question, (_, start, end) in best.items()}


def normalize_answer(text: str) -> str:
    """The SQuAD evaluation's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(predicted: str, gold: str) -> float:
    """SQuAD's F1 over the normalised words of two answers."""
    ours, theirs = normalize_answer(predicted).split(), normalize_answer(gold).split()
    common = sum((Counter(ours) & Counter(theirs)).values())
    if not common:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)

class BertWithHead(nn.Module):
    """BERT with dropout and a linear layer on the pooled [CLS] vector, or on every token's hidden
    state (``per_token``: tags, or qa's start and end logits)."""

    def __init__(self, bert: Bert, outputs: int, dropout: float, norm_eps: float, per_token: bool = False):
        super().__init__()
        self.bert = bert
        self.per_token = per_token
        self.dropout = Dropout(dropout)
        self.head = nn.Linear(bert.pooler.in_features, outputs)
        init_bert_weights(self, norm_eps)

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> Tensor:
        """(B, outputs), or (B, T, outputs) per token."""
        hidden, pooled = self.bert(token_ids, segment_ids)
        return self.head(self.dropout(hidden if self.per_token else pooled))


def macro_f1(predicted: Tensor, target: Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = ((predicted == c) & (target == c)).sum().item()
        fp = ((predicted == c) & (target != c)).sum().item()
        fn = ((predicted != c) & (target == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return 100.0 * sum(scores) / classes


# -- fine-tuning tasks ------------------------------------------------------------------------------
class Task:
    """What one fine-tuning task brings to BertFinetune: ``read`` (rows of every split and the names of
    the head's outputs), ``texts`` (to train WordPiece on), ``encode``, ``batch``, ``loss``,
    ``eval_outputs``, ``score`` and ``predict_file``."""

    per_token = False

    def __init__(self, recipe: BertFinetune):
        self.recipe, self.config = recipe, recipe.config

    def loss(self, logits: Tensor, batch: Batch) -> list[tuple[Tensor, float]]:
        """Cross-entropy summed over the labelled positions, and their count (see :class:`Loss`)."""
        labels = batch["labels"].flatten()
        return [(F.cross_entropy(logits.flatten(0, -2), labels, ignore_index=IGNORE, reduction="sum"), int((labels != IGNORE).sum()))]


class Classify(Task):
    """A label per sentence: labels with probabilities, accuracy and macro-F1."""

    pair = False

    def read(self, seed: int) -> tuple[dict[str, list], list[str]]:
        data = self.config["data"]
        builtin = pair_corpus if self.pair else classify_corpus
        splits = load_splits(data["name"], lambda: builtin(seed), seed, hub_config=data["hub_config"])
        return {split: self._rows(splits[split], split) for split in SPLITS}, label_names(splits["train"], data["label_column"])

    def _rows(self, rows: datasets.Dataset, split: str) -> list[tuple[list[str], str]]:
        """(texts, label name) per row; a row without its texts or label is an error naming the row."""
        data = self.config["data"]
        text_columns = [data["text_column"]] + ([data["text_pair_column"]] if self.pair else [])
        label_column = data["label_column"]
        require_columns(rows, split, [*text_columns, label_column], "data.text_column, data.text_pair_column and data.label_column")
        feature = rows.features[label_column]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        texts = [rows[c][:] for c in text_columns]  # lists: a Column reads Arrow item by item
        out = []
        for i, label in enumerate(rows[label_column][:]):
            fields = [column[i] for column in texts]
            if not all(isinstance(t, str) and t.strip() for t in fields) or label is None:
                raise UsageError(f"the {split} data's row {i + 1} lacks a text or a label: {[*fields, label]!r}")
            out.append((fields, names[label] if names is not None else str(label)))
        return out

    def texts(self, rows: list[tuple[list[str], str]]) -> list[str]:
        return [text for fields, _ in rows for text in fields]

    def encode(self, rows: list[tuple[list[str], str]], split: str) -> list[tuple[list[int], list[int], int]]:
        index = {name: i for i, name in enumerate(self.recipe.labels)}
        out = []
        for i, (fields, name) in enumerate(rows):
            if name not in index:
                raise UsageError(f"the {split} data's row {i + 1} has label '{name}', which the training data does not have")
            out.append((*self.recipe.encode(*fields), index[name]))
        return out

    def batch(self, examples: list[tuple[list[int], list[int], int]]) -> Batch:
        return {
            "token_ids": pad_rows([ids for ids, _, _ in examples], PAD),
            "segment_ids": pad_rows([segments for _, segments, _ in examples], 0),
            "labels": torch.tensor([label for _, _, label in examples]),
        }

    def probabilities(self, model: nn.Module, examples: list[tuple[list[int], list[int], int]]) -> Tensor:
        return torch.cat([logits.softmax(-1) for _, logits in self.recipe.outputs(model, examples)])

    def eval_outputs(self, model: nn.Module, split: str, rank: int, world: int) -> dict[int, int]:
        """The predicted label of each example."""
        out = {}
        for places, logits in self.recipe.outputs(model, self.recipe.examples[split], rank, world):
            out.update(zip(places, logits.argmax(-1).tolist()))
        return out

    def score(self, split: str, outputs: list[int]) -> dict[str, float]:
        predicted = torch.tensor(outputs)
        target = torch.tensor([label for _, _, label in self.recipe.examples[split]])
        return {
            "accuracy": 100.0 * (predicted == target).float().mean().item(),
            "macro_f1": macro_f1(predicted, target, len(self.recipe.labels)),
        }

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None) -> None:
        """One line per input line (a pair as two tab-separated sentences): labels with probabilities."""
        lines = read_lines(path)
        labels = self.recipe.labels
        top_k = min(top_k or self.config["predict"]["top_k"], len(labels))
        examples, kept = [], []
        for number, line in enumerate(lines, 1):
            fields = line.split("\t")
            if not line.strip() or (self.pair and len(fields) != 2):
                what = "two tab-separated sentences" if self.pair else "a sentence"
                print(f"warning: {path}:{number}: expected {what}, the output line is left empty", file=sys.stderr)
                continue
            examples.append((*self.recipe.encode(*(fields if self.pair else [line])), 0))
            kept.append(number)
        results = dict(zip(kept, self.probabilities(model, examples))) if examples else {}
        for number in range(1, len(lines) + 1):
            if number not in results:
                out.write("\n")
                continue
            values, indices = results[number].topk(top_k)
            out.write("\t".join(f"{labels[i]} {p:.3f}" for p, i in zip(values.tolist(), indices.tolist())) + "\n")


class ClassifyPair(Classify):
    """A label per pair of sentences, [CLS] A [SEP] B [SEP]."""

    pair = True


class Tag(Task):
    """A label per word, read at its first sub-token: word/TAG predictions, entity F1."""

    per_token = True

    def read(self, seed: int) -> tuple[dict[str, list], list[str]]:
        data = self.config["data"]
        splits = load_splits(data["name"], lambda: tag_corpus(seed), seed, hub_config=data["hub_config"])
        rows = {split: self._rows(splits[split], split) for split in SPLITS}
        return rows, sorted({t for _, tags in rows["train"] for t in tags}, key=lambda t: (t != "O", t))

    def _rows(self, rows: datasets.Dataset, split: str) -> list[tuple[list[str], list[str]]]:
        data = self.config["data"]
        columns = [data["tokens_column"], data["tags_column"]]
        require_columns(rows, split, columns, "data.tokens_column and data.tags_column")
        feature = rows.features[columns[1]]
        names = getattr(getattr(feature, "feature", None), "names", None)  # a Sequence of ClassLabel (conll2003)
        out = []
        for i, (words, tags) in enumerate(zip(rows[columns[0]][:], rows[columns[1]][:])):
            if not words or len(words) != len(tags):
                raise UsageError(f"the {split} data's sentence {i + 1} has {len(words or [])} words but {len(tags or [])} tags")
            out.append((list(words), [names[t] for t in tags] if names else [str(t) for t in tags]))
        return out

    def texts(self, rows: list[tuple[list[str], list[str]]]) -> list[str]:
        return [" ".join(words) for words, _ in rows]

    def _encode_words(self, words: list[str]) -> tuple[list[int], list[int]]:
        """[CLS] sub-tokens [SEP] and, per position, the index of its word where it is the word's first
        sub-token (else IGNORE)."""
        tokenizer = self.recipe.tokenizer
        encoding = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
        limit = self.config["data"]["max_length"] - 2
        firsts, seen = [], set()
        for word in encoding.word_ids[:limit]:
            firsts.append(word if word is not None and word not in seen else IGNORE)
            seen.add(word)
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        return [cls, *encoding.ids[:limit], sep], [IGNORE, *firsts, IGNORE]

    def encode(self, rows: list[tuple[list[str], list[str]]], split: str) -> list[tuple[list[int], list[int], list[int]]]:
        index = {name: i for i, name in enumerate(self.recipe.labels)}
        out = []
        for i, (words, tags) in enumerate(rows):
            unknown = set(tags) - set(index)
            if unknown:
                raise UsageError(f"the {split} data's sentence {i + 1} has tags {sorted(unknown)} that the training data does not have")
            ids, firsts = self._encode_words(words)
            out.append((ids, [0] * len(ids), [IGNORE if w == IGNORE else index[tags[w]] for w in firsts]))
        return out

    def batch(self, examples: list[tuple[list[int], list[int], list[int]]]) -> Batch:
        return {
            "token_ids": pad_rows([ids for ids, _, _ in examples], PAD),
            "segment_ids": pad_rows([segments for _, segments, _ in examples], 0),
            "labels": pad_rows([labels for _, _, labels in examples], IGNORE),
        }

    def predicted_tags(self, model: nn.Module, examples: list[tuple[list[int], list[int], list[int]]], rank: int = 0, world: int = 1) -> dict[int, list[str]]:
        """The tag of each word, read at its first sub-token (the positions whose label is not IGNORE),
        keyed by the example's place."""
        out = {}
        for places, logits in self.recipe.outputs(model, examples, rank, world):
            for place, row in zip(places, logits.argmax(-1).tolist()):
                out[place] = [self.recipe.labels[row[i]] for i, label in enumerate(examples[place][2]) if label != IGNORE]
        return out

    def eval_outputs(self, model: nn.Module, split: str, rank: int, world: int) -> dict[int, list[str]]:
        return self.predicted_tags(model, self.recipe.examples[split], rank, world)

    def score(self, split: str, predicted: list[list[str]]) -> dict[str, float]:
        examples = self.recipe.examples[split]
        gold = [[self.recipe.labels[label] for label in labels if label != IGNORE] for _, _, labels in examples]
        true_spans = [entities(tags) for tags in gold]
        found_spans = [entities(tags) for tags in predicted]
        correct = sum(len(t & f) for t, f in zip(true_spans, found_spans))
        found, true = sum(map(len, found_spans)), sum(map(len, true_spans))
        precision, recall = correct / max(1, found), correct / max(1, true)
        words = sum(map(len, gold))
        return {
            "entity_f1": 100.0 * (2 * precision * recall / (precision + recall) if correct else 0.0),
            "entity_precision": 100.0 * precision,
            "entity_recall": 100.0 * recall,
            "word_accuracy": 100.0 * sum(p == g for ps, gs in zip(predicted, gold) for p, g in zip(ps, gs)) / max(1, words),
        }

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None) -> None:
        """One line per input line: each word as word/TAG; words past max_length are tagged O."""
        for number, line in enumerate(read_lines(path), 1):
            words = line.split()
            if not words:
                print(f"warning: {path}:{number}: empty line, its output is left empty", file=sys.stderr)
                out.write("\n")
                continue
            ids, firsts = self._encode_words(words)
            labels = [IGNORE if w == IGNORE else 0 for w in firsts]
            tags = self.predicted_tags(model, [(ids, [0] * len(ids), labels)])[0]
            tags += ["O"] * (len(words) - len(tags))
            out.write(" ".join(f"{word}/{tag}" for word, tag in zip(words, tags)) + "\n")


class QuestionAnswering(Task):
    """Extractive question answering (SQuAD v1.1): the answer's first and last token in the context,
    scored by exact match and F1."""

    per_token = True

    def read(self, seed: int) -> tuple[dict[str, list], list[str]]:
        data = self.config["data"]
        path = Path(data["name"]).expanduser()
        files = {split: path / f"{split}.json" for split in SPLITS} if path.is_dir() else {"train": path}
        squad = {split: read_squad(file) for split, file in files.items() if file.suffix == ".json" and file.is_file()}
        questions = {split: found for split, found in squad.items() if found is not None}
        if questions and "train" not in questions:
            raise UsageError(f"data folder {path} has no train.json beside {', '.join(f'{s}.json' for s in questions)}")
        if not questions:  # the built-in data, JSON lines and Hugging Face datasets: rows in squad's layout
            splits = load_splits(data["name"], lambda: qa_corpus(seed), seed, hub_config=data["hub_config"], carve=False)
            questions = {split: self._rows(rows, split) for split, rows in splits.items()}
        return carve_by_context(questions, seed), ["start", "end"]

    def _rows(self, rows: datasets.Dataset, split: str) -> list[Question]:
        data = self.config["data"]
        columns = [data["question_column"], data["context_column"], data["answers_column"]]
        require_columns(rows, split, columns, "data.question_column, data.context_column and data.answers_column")
        ids = rows["id"][:] if "id" in rows.column_names else [str(i + 1) for i in range(len(rows))]
        out = []
        for i, (qid, question, context, answers) in enumerate(zip(ids, *(rows[c][:] for c in columns))):
            if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or not isinstance(answers.get("answer_start"), list):
                raise UsageError(f"the {split} data's row {i + 1} has answers {answers!r}, not {{'text': [...], 'answer_start': [...]}}")
            given = list(zip(answers["text"], answers["answer_start"]))
            out.append(checked_question(f"the {split} data's row {i + 1}", str(qid), question, context, given))
        return out

    def texts(self, rows: list[Question]) -> list[str]:
        return [q.question for q in rows] + list(dict.fromkeys(q.context for q in rows))

    def encode(self, rows: list[Question], split: str) -> list[Window]:
        """Every window of every question; a question trains on its first answer, as in HF run_qa."""
        data, tokenizer = self.config["data"], self.recipe.tokenizer
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        asked = self.recipe.token_ids([q.question for q in rows])
        unique = list(dict.fromkeys(q.context for q in rows))  # SQuAD asks about five questions per context
        contexts = {c: (e.ids, e.offsets) for c, e in zip(unique, tokenizer.encode_batch(unique, add_special_tokens=False))}
        out = []
        for number, (question, ids) in enumerate(zip(rows, asked)):
            answer = (question.answers[0][1], question.answers[0][1] + len(question.answers[0][0])) if question.answers else None
            out += windows(ids, *contexts[question.context], answer, data["max_length"], data["doc_stride"], number, cls, sep)
        return out

    def batch(self, examples: list[Window]) -> Batch:
        return {
            "token_ids": pad_rows([w.ids for w in examples], PAD),
            "segment_ids": pad_rows([w.segments for w in examples], 0),
            "start": torch.tensor([w.start for w in examples]),
            "end": torch.tensor([w.end for w in examples]),
        }

    def loss(self, logits: Tensor, batch: Batch) -> list[tuple[Tensor, float]]:
        """The mean of the start and end cross-entropies."""
        total = F.cross_entropy(logits[..., 0], batch["start"], reduction="sum") + F.cross_entropy(logits[..., 1], batch["end"], reduction="sum")
        return [(total, 2 * len(logits))]

    def window_answers(self, model: nn.Module, windows: list[Window], rank: int = 0, world: int = 1) -> dict[int, tuple[float, int, int]]:
        """Each window's best answer (:func:`window_answer`), keyed by the window's place."""
        out = {}
        for places, logits in self.recipe.outputs(model, windows, rank, world):
            out.update((place, window_answer(windows[place], scores, self.config["data"]["max_answer_length"])) for place, scores in zip(places, logits))
        return out

    def answers(self, model: nn.Module, rows: list[Question], windows: list[Window]) -> list[tuple[int, int]]:
        """Each question's answer as characters [start, end) of its context."""
        candidates = self.window_answers(model, windows)
        spans = best_answers(windows, [candidates[i] for i in range(len(windows))])
        return [spans[number] for number in range(len(rows))]

    def eval_outputs(self, model: nn.Module, split: str, rank: int, world: int) -> dict[int, tuple[float, int, int]]:
        return self.window_answers(model, self.recipe.examples[split], rank, world)

    def score(self, split: str, candidates: list[tuple[float, int, int]]) -> dict[str, float]:
        rows = self.recipe.rows[split]
        spans = best_answers(self.recipe.examples[split], candidates)
        exact = f1 = 0.0
        for number, question in enumerate(rows):
            start, end = spans[number]
            predicted = question.context[start:end]
            exact += max(float(normalize_answer(predicted) == normalize_answer(text)) for text, _ in question.answers)
            f1 += max(answer_f1(predicted, text) for text, _ in question.answers)
        return {"exact_match": 100.0 * exact / max(1, len(rows)), "f1": 100.0 * f1 / max(1, len(rows))}

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None) -> None:
        """One line per question: the answer, its first and end character in the context
        (context[start:end]), and the question's id where the input has ids. The input is a SQuAD
        .json file, a .jsonl file of question/context rows, or lines of question<TAB>context; a bad
        row or line leaves its output line empty."""
        found = self._questions(path)
        rows = [q for q in found if q is not None]
        spans = iter(self.answers(model, rows, self.encode(rows, "predict")))
        for question in found:
            if question is None:
                out.write("\n")
                continue
            start, end = next(spans)
            answer = re.sub(r"[\t\r\n]", " ", question.context[start:end])  # one line per answer, as long as its span
            out.write("\t".join([answer, str(start), str(end)] + ([question.id] if question.id else [])) + "\n")

    def _questions(self, path: Path) -> list[Question | None]:
        """The questions of a predict input; None for a bad row or line, which is warned about."""
        if path.suffix == ".json":
            if not path.is_file():
                raise UsageError(f"{path}: no such file")
            found = read_squad(path, answers=False)
            if found is None:
                raise UsageError(f"{path}: not one JSON object in SQuAD's layout (use .jsonl for a question and context per line)")
            return found
        data = self.config["data"]
        out: list[Question | None] = []
        for number, line in enumerate(read_lines(path), 1):
            try:
                if path.suffix == ".jsonl":
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise UsageError("expected a JSON object")
                    qid, question, context = str(row.get("id", "")), row.get(data["question_column"]), row.get(data["context_column"])
                elif "\t" in line:
                    question, context = line.split("\t", 1)
                    qid = ""
                else:
                    raise UsageError("expected a question and its context separated by a tab")
                out.append(checked_question("the line", qid, question, context, None))
            except (UsageError, json.JSONDecodeError) as e:
                print(f"warning: {path}:{number}: {e}; the output line is left empty", file=sys.stderr)
                out.append(None)
        return out


TASKS = {"classify": Classify, "classify-pair": ClassifyPair, "tag": Tag, "qa": QuestionAnswering}


@register("recipe", "bert-finetune")
class BertFinetune(BertRecipe):
    """BERT fine-tuning (--set task=classify|classify-pair|tag|qa) from a pretrain run or Hugging Face BERT."""

    config_file = "bert-finetune.yaml"
    labels: list[str]  # the names of the head's outputs: classes, tags, or start and end

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        if config["task"] not in TASKS:
            raise UsageError(f"unknown task '{config['task']}' (valid: {', '.join(TASKS)})")
        self.task = TASKS[config["task"]](self)

    def prepare(self, run_dir: Path | None = None) -> None:
        rows, labels = self.task.read(self.config["seed"])
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.labels = labels
            if self.config["init"]:
                self.tokenizer = load_tokenizer(Path(self.config["init"]))
            else:
                self.tokenizer = train_wordpiece(self.task.texts(rows["train"]), self.config["data"]["vocab_size"], SPECIALS)
        check_specials(self.tokenizer, self.config["init"] or "this run")
        self.rows = rows
        self.examples = {split: self.task.encode(rows[split], split) for split in SPLITS}

    def save(self, run_dir: Path) -> None:
        super().save(run_dir)
        runs.write_json(run_dir, "labels.json", self.labels)

    def load(self, run_dir: Path) -> None:
        super().load(run_dir)
        self.labels = runs.read_json(run_dir, "labels.json")

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        bert = build_bert(self.tokenizer.get_vocab_size(), self.config)
        return BertWithHead(bert, len(self.labels), m["dropout"], m["norm_eps"], per_token=self.task.per_token)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        examples, size = self.examples["train"], self.config["train"]["batch_size"]
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.config["seed"] * 1_000_003 + epoch))
        for start in range(0, len(order), size):
            yield self.task.batch([examples[i] for i in order[start : start + size].tolist()])

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        logits = model(batch["token_ids"], batch["segment_ids"])
        return Loss(self.task.loss(logits.float(), batch), int((batch["token_ids"] != PAD).sum()))

    @torch.no_grad()
    def outputs(self, model: nn.Module, examples: list, rank: int = 0, world: int = 1) -> Iterator[tuple[range, Tensor]]:
        """(places of a batch of examples, their logits on the CPU), predict.batch_size examples at a
        time; process ``rank`` of ``world`` gets its share of the batches (:func:`batch_ranges`)."""
        model.eval()
        device = next(model.parameters()).device
        for places in batch_ranges(len(examples), self.config["predict"]["batch_size"], rank, world):
            batch = self.task.batch(examples[places.start : places.stop])
            yield places, model(batch["token_ids"].to(device), batch["segment_ids"].to(device)).float().cpu()

    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1) -> dict[int, Any]:
        return self.task.eval_outputs(model, split, rank, world)

    def score(self, split: str, outputs: list[Any]) -> dict[str, float]:
        return self.task.score(split, outputs)

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None = None) -> None:
        self.task.predict_file(model, path, out, top_k)

    # -- starting points ----------------------------------------------------------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        if (path / runs.CONFIG).is_file():  # a tfkit bert-pretrain run
            config = runs.read_config(path)
            if config.get("recipe") != "bert-pretrain":
                raise UsageError(f"{path} is a {config.get('recipe')} run, not a bert-pretrain one")
            return {"model": config["model"]}
        if (path / "config.json").is_file():
            return {"model": bert_config_from_hf(path)}
        raise UsageError(f"{path} is neither a bert-pretrain run directory nor a Hugging Face BERT folder")

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        if (path / runs.CONFIG).is_file():
            runs.require(path, runs.WEIGHTS)
            weights = {k.removeprefix("bert."): v for k, v in load_file(str(path / runs.WEIGHTS)).items() if k.startswith("bert.")}
        else:
            weights = bert_weights_from_hf(path, len(model.bert.encoder.layers))
        try:
            model.bert.load_state_dict(weights)
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})") from None
