"""Sentence pairs: the built-in corpus and readers of the user's.

The built-in corpus is numbers written in words in two languages. German puts units before tens
("siebenundvierzig"), so an English↔German model must reorder, not copy word by word. A user's pairs
come in two columns (``data.source_column``, ``data.target_column``) or, in the wmt layout, one
``translation`` column of {language: text}.
"""

from __future__ import annotations

import math
import random
from typing import Any

import datasets
from num2words import num2words

from tfkit.data import SPLITS, VOCAB_SAMPLE, Unusable, cached
from tfkit.errors import UsageError

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD, UNK, BOS, EOS = range(len(SPECIALS))


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


def read_pairs(rows: dict[str, list], data: dict[str, Any], first: int = 0) -> tuple[list[tuple[str, str] | None], list[str]]:
    """The (source, target) texts of rows given as {column: values}, by the ``data.*`` config (None
    for a row without both), and why each such row cannot be used: rows first, first + 1, ... A pair is one row of a file of
    many, so a row without both texts is skipped and counted (under :class:`tfkit.data.Unusable`'s
    1% rule), never the file."""
    if "translation" in rows:
        langs = data["source_lang"], data["target_lang"]
        found = [tuple(row.get(lang) for lang in langs) if isinstance(row, dict) else (None, None) for row in rows["translation"]]
    else:
        found = list(zip(rows[data["source_column"]], rows[data["target_column"]]))
    pairs, problems = [], []
    for i, pair in enumerate(found):
        if all(isinstance(text, str) and text.strip() for text in pair):
            pairs.append(pair)
        else:
            pairs.append(None)
            problems.append(
                f"row {first + i + 1} lacks a {'source' if not (isinstance(pair[0], str) and pair[0].strip()) else 'target'} text"
            )
    return pairs, problems


def usable_pairs(rows: dict[str, list], data: dict[str, Any], split: str) -> list[tuple[str, str]]:
    """A whole split's usable pairs, the others reported (a warning, or one error line past 1%)."""
    pairs, problems = read_pairs(rows, data)
    unusable = Unusable("sentence pairs", split)
    for problem in problems:
        unusable.skip(problem)
    unusable.report(len(pairs))
    return [pair for pair in pairs if pair is not None]


def sample_rows(rows: datasets.Dataset) -> dict[str, list]:
    """At most VOCAB_SAMPLE / 2 rows, evenly spaced, as {column: values}: what sizes are measured on."""
    step = max(1, math.ceil(2 * len(rows) / VOCAB_SAMPLE))
    return rows[::step] if step > 1 else rows[:]
