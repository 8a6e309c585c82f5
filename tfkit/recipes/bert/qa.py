"""Extractive question answering (SQuAD v1.1): reading SQuAD files and rows, carving held-out splits by
context, windows over long contexts that overlap by ``doc_stride`` tokens, the best span over all of a
question's windows, SQuAD's exact match and F1, and the ``qa`` fine-tuning task."""

from __future__ import annotations

import json
import random
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit.data import (
    SPLITS,
    as_evaluation,
    load_splits,
    pad_rows,
    read_lines,
    require_columns,
)
from tfkit.errors import UsageError
from tfkit.recipe import Batch
from tfkit.recipes.bert.data import CLS, PAD, SEP, qa_corpus
from tfkit.recipes.bert.tasks import Task


class Question(NamedTuple):
    """One question about a context, with its gold answers."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, first character in the context); none when predicting


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
            raise UsageError(
                f"{where}: answer_start {start!r} does not fit the answer {text!r} in its context of {len(context)} characters"
            )
        if context[start : start + len(text)] != text:
            raise UsageError(
                f"{where}: the answer {text!r} is not the context's text at {start} ({context[start : start + len(text)]!r})"
            )
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
                    given = [
                        (field(x, "text", str, f"{entry}.answers[{k}]"), field(x, "answer_start", int, f"{entry}.answers[{k}]"))
                        for k, x in enumerate(field(qa, "answers", list, entry))
                    ]
                out.append(checked_question(f"{path}: {entry}", qid, field(qa, "question", str, entry), context, given))
    return out


def carve_by_context(questions: dict[str, list[Question]], seed: int, held_out: float = 0.05) -> dict[str, list[Question]]:
    """The validation and test splits a source lacks, carved from its training questions a
    ``held_out`` share of the contexts each: unlike rows carved by load_splits, no held-out question
    is then about a context trained on."""
    evaluated = as_evaluation(questions)
    if evaluated is not None:
        return evaluated
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


def windows(
    question: list[int],
    context: list[int],
    offsets: list[tuple[int, int]],
    answer: tuple[int, int] | None,
    max_length: int,
    stride: int,
    number: int = 0,
    cls: int = CLS,
    sep: int = SEP,
) -> list[Window]:
    """Windows over a context's tokens that overlap by ``stride`` tokens (HF run_qa's doc_stride),
    each beside the question; ``answer`` is the characters [start, end) of the context to label."""
    question = question[: max_length // 2]  # a long question still leaves half of each window to the context
    room = max_length - len(question) - 3
    if stride >= room:
        raise UsageError(
            f"data.doc_stride {stride} must be smaller than the {room} context tokens that fit beside a "
            f"question of {len(question)} tokens in data.max_length {max_length}"
        )
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


class QuestionAnswering(Task):
    """Extractive question answering (SQuAD v1.1): the answer's first and last token in the context,
    scored by exact match and F1."""

    per_token = True
    builtin_labels = 2
    hf_class = "BertForQuestionAnswering"

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
            if (
                not isinstance(answers, dict)
                or not isinstance(answers.get("text"), list)
                or not isinstance(answers.get("answer_start"), list)
            ):
                raise UsageError(
                    f"the {split} data's row {i + 1} has answers {answers!r}, not {{'text': [...], 'answer_start': [...]}}"
                )
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
        total = F.cross_entropy(logits[..., 0], batch["start"], reduction="sum") + F.cross_entropy(
            logits[..., 1], batch["end"], reduction="sum"
        )
        return [(total, 2 * len(logits))]

    def window_answers(
        self, model: nn.Module, windows: list[Window], rank: int = 0, world: int = 1
    ) -> dict[int, tuple[float, int, int]]:
        """Each window's best answer (:func:`window_answer`), keyed by the window's place."""
        out = {}
        for places, logits in self.recipe.outputs(model, windows, rank, world):
            out.update(
                (place, window_answer(windows[place], scores, self.config["data"]["max_answer_length"]))
                for place, scores in zip(places, logits)
            )
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
                raise UsageError(
                    f"{path}: not one JSON object in SQuAD's layout (use .jsonl for a question and context per line)"
                )
            return found
        data = self.config["data"]
        out: list[Question | None] = []
        for number, line in enumerate(read_lines(path), 1):
            try:
                if path.suffix == ".jsonl":
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise UsageError("expected a JSON object")
                    qid, question, context = (
                        str(row.get("id", "")),
                        row.get(data["question_column"]),
                        row.get(data["context_column"]),
                    )
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
