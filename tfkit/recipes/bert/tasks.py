"""The sentence and token fine-tuning tasks: what each brings to ``bert-finetune`` (its data, encoding,
batches, loss, metrics and predictions). Question answering, which reads its contexts in windows, is
:mod:`tfkit.recipes.bert.qa`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit.data import (
    SPLITS,
    check_labels,
    label_names,
    load_splits,
    pad_rows,
    read_lines,
    require_columns,
)
from tfkit.errors import UsageError
from tfkit.recipe import Batch
from tfkit.recipes.bert.data import PAD, classify_corpus, pair_corpus, tag_corpus

if TYPE_CHECKING:
    from tfkit.recipes.bert.finetune import BertFinetune

IGNORE = -100  # label of the positions a tagger is not scored on: specials and non-first sub-tokens


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


def macro_f1(predicted: Tensor, target: Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = ((predicted == c) & (target == c)).sum().item()
        fp = ((predicted == c) & (target != c)).sum().item()
        fn = ((predicted != c) & (target == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return 100.0 * sum(scores) / classes


class Task:
    """What one fine-tuning task brings to BertFinetune: ``read`` (rows of every split and the names of
    the head's outputs), ``texts`` (to train WordPiece on), ``encode``, ``batch``, ``loss``,
    ``eval_outputs``, ``score`` and ``predict_file``."""

    per_token = False
    builtin_labels = 5  # the head's outputs on the built-in data, for counting parameters without it
    hf_class = "BertForSequenceClassification"  # the transformers model of the same task (tfkit export)

    def __init__(self, recipe: BertFinetune):
        self.recipe, self.config = recipe, recipe.config

    def loss(self, logits: Tensor, batch: Batch) -> list[tuple[Tensor, float]]:
        """Cross-entropy summed over the labelled positions, and their count (see :class:`Loss`)."""
        labels = batch["labels"].flatten()
        return [
            (F.cross_entropy(logits.flatten(0, -2), labels, ignore_index=IGNORE, reduction="sum"), int((labels != IGNORE).sum()))
        ]


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
        require_columns(
            rows, split, [*text_columns, label_column], "data.text_column, data.text_pair_column and data.label_column"
        )
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
        check_labels((name for _, name in rows), index, split)
        return [(*self.recipe.encode(*fields), index[name]) for fields, name in rows]

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
    builtin_labels = 2


class Tag(Task):
    """A label per word, read at its first sub-token: word/TAG predictions, entity F1."""

    per_token = True
    builtin_labels = 4
    hf_class = "BertForTokenClassification"

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
        check_labels((tag for _, tags in rows for tag in tags), index, split, "tag")
        out = []
        for words, tags in rows:
            ids, firsts = self._encode_words(words)
            out.append((ids, [0] * len(ids), [IGNORE if w == IGNORE else index[tags[w]] for w in firsts]))
        return out

    def batch(self, examples: list[tuple[list[int], list[int], list[int]]]) -> Batch:
        return {
            "token_ids": pad_rows([ids for ids, _, _ in examples], PAD),
            "segment_ids": pad_rows([segments for _, segments, _ in examples], 0),
            "labels": pad_rows([labels for _, _, labels in examples], IGNORE),
        }

    def predicted_tags(
        self, model: nn.Module, examples: list[tuple[list[int], list[int], list[int]]], rank: int = 0, world: int = 1
    ) -> dict[int, list[str]]:
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
