"""Data adapters shared by the recipes.

Every source ends up as a ``datasets.DatasetDict`` with train/validation/test splits, through one
path: the built-in data of a recipe, a local file (.tsv/.csv/.jsonl/.json/.txt), a folder holding
train/validation/test files or images in class folders, or a Hugging Face dataset name
(``datasets.load_dataset``, online).
Splits a source lacks are carved from its training split, deterministically by seed.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

import datasets
import numpy as np
import pyarrow as pa
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
)
from torch import Tensor

from tfkit.errors import UsageError

SPLITS = ("train", "validation", "test")
T = TypeVar("T")
_BUILDERS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".txt": "text", ".conll": "conll"}
_FORMATS = ", ".join(_BUILDERS)

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()


def load_splits(
    spec: str,
    builtin: Callable[[], datasets.DatasetDict],
    seed: int,
    held_out: float = 0.05,
    hub_config: str | None = None,
    carve: bool = True,
    split_names: dict[str, str] | None = None,
) -> datasets.DatasetDict:
    """Resolve ``--data`` into train/validation/test; ``held_out`` is each carved split's fraction.
    With ``carve=False`` the splits come back as the source has them (a recipe that must split by
    document rather than by row carves its own). ``split_names`` maps train/validation/test to the
    source's own split names (librispeech_asr's "train.100")."""
    if spec == "builtin":
        return as_evaluation(builtin()) or builtin()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = {s: f for s in SPLITS for f in sorted(path.glob(f"{s}.*")) if f.suffix in _BUILDERS}
        if files:
            if "train" not in files:
                raise UsageError(f"data folder {path} has no train file ({_FORMATS})")
            loaded = datasets.DatasetDict({s: _load_file(f)["train"] for s, f in files.items()})
        else:
            loaded = _load_image_folder(path)
    elif path.suffix in _BUILDERS or path.exists():
        if not path.is_file():
            raise UsageError(f"data file {path} does not exist")
        if path.suffix not in _BUILDERS:
            raise UsageError(f"data file {path} has an unknown format (use {_FORMATS})")
        loaded = _load_file(path)
    else:
        try:
            loaded = datasets.load_dataset(spec, hub_config)
        except Exception as e:  # the hub raises many types: offline, unknown name, missing config
            raise UsageError(f"could not load dataset '{spec}' ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if split_names:
        loaded = datasets.DatasetDict(
            {ours: loaded[split_names.get(ours, ours)] for ours in SPLITS if split_names.get(ours, ours) in loaded}
        )
    evaluated = as_evaluation(loaded)
    if evaluated is not None:
        return evaluated
    if not carve:
        if "train" not in loaded:
            raise UsageError(f"the dataset has no train split (it has: {', '.join(loaded)})")
        return datasets.DatasetDict({s: loaded[s] for s in SPLITS if s in loaded})
    return complete_splits(loaded, seed, held_out)


_evaluated_split: str | None = None  # inside evaluation_data(): the split that tfkit evaluate --data scores


@contextmanager
def evaluation_data(split: str) -> Iterator[None]:
    """Within this block the data a recipe reads is one set to score, whole (``tfkit evaluate RUN
    --data PATH``, through the recipe's own readers): every split it asks for is the source's
    ``split``, or the source's only split (a single file), and nothing is carved from it."""
    global _evaluated_split
    _evaluated_split = split
    try:
        yield
    finally:
        _evaluated_split = None


def as_evaluation(loaded: Mapping[str, T]) -> Mapping[str, T] | None:
    """``loaded`` (split → rows, or questions, or documents) as every split inside
    :func:`evaluation_data`; None outside it, where splits are carved as usual."""
    if _evaluated_split is None:
        return None
    if _evaluated_split in loaded:
        chosen = loaded[_evaluated_split]
    elif len(loaded) == 1:
        (chosen,) = loaded.values()
    else:
        raise UsageError(f"the data has no {_evaluated_split} split (it has: {', '.join(loaded)}; pick one with --split)")
    return type(loaded)({split: chosen for split in SPLITS})


def check_labels(found: Iterable[str], known: Iterable[str], split: str, what: str = "label") -> None:
    """Every label of ``split`` must be one the model has an output for; the error counts and names
    the others (at most five, the most frequent first)."""
    index = set(known)
    unseen = Counter(label for label in found if label not in index)
    if unseen:
        named = ", ".join(f"'{name}' ({count})" for name, count in unseen.most_common(5))
        more = f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""
        count = f"{sum(unseen.values())} {what}s"
        if _evaluated_split is not None:  # every split is the data being scored
            raise UsageError(
                f"the data has {count} that the run was never trained on: {named}{more} (the model has no output for them)"
            )
        raise UsageError(f"the {split} data has {count} that the training data does not have: {named}{more}")


def cache_dir() -> Path:
    """Where tfkit keeps what it builds once: $TFKIT_CACHE, default ~/.cache/tfkit."""
    return Path(os.environ.get("TFKIT_CACHE", Path.home() / ".cache" / "tfkit"))


def cached(name: str, key: dict, build: Callable[[], datasets.DatasetDict]) -> datasets.DatasetDict:
    """Build a generated dataset once and keep it under :func:`cache_dir`."""
    root = cache_dir()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = root / f"{name}-{digest}"
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    built = build()
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    built.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return built


def _load_file(path: Path) -> datasets.DatasetDict:
    if path.suffix == ".conll":
        return datasets.DatasetDict({"train": read_conll(path)})
    options: dict = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), **options)
    except Exception as e:
        raise UsageError(f"could not read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _load_image_folder(path: Path) -> datasets.DatasetDict:
    """One subfolder of images per class (torchvision's ImageFolder layout), optionally under
    train/, validation/ and test/ folders."""
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception:
        raise UsageError(
            f"data folder {path} holds neither train files ({_FORMATS}) nor images in one subfolder per class"
        ) from None


def complete_splits(loaded: datasets.DatasetDict, seed: int, held_out: float) -> datasets.DatasetDict:
    """The validation and test splits ``loaded`` lacks, each carved from its train split (``held_out`` of its rows)."""
    evaluated = as_evaluation(loaded)
    if evaluated is not None:
        return evaluated
    if "train" not in loaded:
        raise UsageError(f"the dataset has no train split (it has: {', '.join(loaded)})")
    out = dict(loaded)
    for split in ("test", "validation"):
        if split not in out:
            size = max(1, int(round(held_out * len(loaded["train"]))))
            if len(out["train"]) <= size:
                raise UsageError(f"the dataset has too few rows ({len(out['train'])}) to hold out a {split} split")
            parts = out["train"].train_test_split(test_size=size, seed=seed)
            out["train"], out[split] = parts["train"], parts["test"]
    return datasets.DatasetDict({s: out[s] for s in SPLITS})


def encode_once(
    rows: datasets.Dataset, encode: Callable, settings: object, features: datasets.Features | None = None
) -> datasets.Dataset:
    """``rows`` mapped by ``encode(batch, indices) -> columns`` into a new Arrow table: written to
    datasets' cache when ``rows`` come from files (memory-mapped, read back a batch at a time), and
    named by the rows and ``settings`` (what else the encoding depends on, as JSON), so a resumed run
    or another rank reuses it instead of encoding again. (datasets would name it by hashing
    ``encode``, which fails for closures over tokenizers and feature extractors.)"""
    name = hashlib.sha1(json.dumps([rows._fingerprint, settings], sort_keys=True).encode()).hexdigest()
    return rows.map(
        encode,
        batched=True,
        batch_size=100,
        with_indices=True,
        remove_columns=rows.column_names,
        features=features,
        new_fingerprint=name,
    )


MAX_UNUSABLE = 0.01  # past this share of a split's inputs unusable (and more than one), preparation stops


class Unusable:
    """The inputs of one split that a reader had to skip (a file that cannot be read or decoded, a
    row with no usable value), reported once: a warning naming the first few and the count. Past
    MAX_UNUSABLE of the split's inputs (and more than one) it is one error line instead: that many
    is a wrong folder or a broken download, not noise, and a model trained on the rest would mislead.
    Every recipe's readers report through it, so one bad file in ten thousand never costs a corpus."""

    SHOWN = 3

    def __init__(self, what: str, split: str):
        self.what, self.split, self.skipped = what, split, []

    def skip(self, problem: str) -> None:
        """One input skipped; ``problem`` names it and says why (``path: not UTF-8 text``)."""
        self.skipped.append(problem)

    def report(self, total: int) -> None:
        """After the split's ``total`` inputs (skipped ones included) were read."""
        count = len(self.skipped)
        if not count:
            return
        shown = "; ".join(self.skipped[: self.SHOWN]) + (f"; and {count - self.SHOWN} more" if count > self.SHOWN else "")
        if count == total or (count > 1 and count > MAX_UNUSABLE * total):
            raise UsageError(
                f"{count} of the {total} {self.what} in the {self.split} data cannot be used, more than "
                f"{MAX_UNUSABLE:.0%} ({shown}; fix or remove them)"
            )
        print(f"warning: skipped {count} of the {total} {self.what} in the {self.split} data ({shown})", file=sys.stderr)


def report_unusable(encoded: datasets.Dataset, split: str, what: str) -> None:
    """:class:`Unusable`'s report for rows whose ``problem`` column says why they cannot be used."""
    unusable = Unusable(what, split)
    for problem in filter(None, encoded["problem"]):
        unusable.skip(problem)
    unusable.report(len(encoded))


def require_columns(rows: datasets.Dataset, split: str, columns: list[str], keys: str) -> None:
    """Each named column must exist; the error lists the ones there are and the config ``keys`` to set."""
    for column in columns:
        if column not in rows.column_names:
            raise UsageError(f"the {split} data has no column '{column}' (it has: {', '.join(rows.column_names)}; set {keys})")


def label_names(rows: datasets.Dataset, column: str) -> list[str]:
    """The classes of a label column: a ClassLabel's own names in order, else the sorted values."""
    feature = rows.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return sorted({str(label) for label in rows[column][:]})


def read_conll(path: Path) -> datasets.Dataset:
    """CoNLL: one word per line with its tag in the last column, a blank line between sentences,
    -DOCSTART- lines ignored → rows of ``tokens`` and ``tags``. A line without a tag names file and line."""
    sentences, words, tags = [], [], []
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if len(fields) < 2:
            raise UsageError(f"{path}:{number}: expected a word and its tag, got {line.strip()!r}")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append((words, tags))
    return datasets.Dataset.from_dict({"tokens": [w for w, _ in sentences], "tags": [t for _, t in sentences]})


def read_text(path: Path) -> str:
    """A user's UTF-8 text file, as it is; a missing or undecodable file is a UsageError."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_lines(path: Path) -> list[str]:
    """A user's UTF-8 text file as lines; a missing, empty or undecodable file is a UsageError."""
    text = read_text(path)
    if not text.strip():
        raise UsageError(f"{path}: the file is empty")
    return text.splitlines()


def train_bpe(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-pair-encoding tokenizer over whitespace-marked pieces (SentencePiece's ▁), so decoding
    restores the text exactly."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


VOCAB_SIZES = (500, 1000, 2000, 4000, 8000, 16000, 32000)
VOCAB_SAMPLE = 100_000  # texts the vocabulary size is measured on; more cost time and change little
MEDIAN_COUNT = 10  # from a sweep on a real 22k-pair corpus scored on its test split; benchmarks/vocab_sweep.py now scores validation, not yet re-run


def choose_vocab_size(texts: list[str], fit: Callable[[list[str], int], Tokenizer], total: int | None = None) -> tuple[int, str]:
    """The largest of VOCAB_SIZES at which the median subword learned by ``fit(texts, size)`` still
    occurs MEDIAN_COUNT times in the training text, scaled to ``total`` texts where ``texts`` is a
    sample of them (or all the pieces a smaller text has to learn), and (value, why). A larger vocabulary shortens the sequences, but past that
    size most of its pieces are seen too rarely to learn (Gowda and May, 2020, measure the same
    trade-off by the rarest pieces)."""
    total = total or len(texts)
    needed = MEDIAN_COUNT * len(texts) / total
    for size in VOCAB_SIZES:
        tokenizer = fit(texts, size)
        alphabet = {i for piece, i in tokenizer.get_vocab().items() if len(piece.lstrip("▁#")) <= 1}
        counts = np.bincount([i for e in tokenizer.encode_batch(texts) for i in e.ids if i not in alphabet])
        learned = counts[counts > 0]
        if size > VOCAB_SIZES[0] and (not len(learned) or np.median(learned) < needed):
            break
        chosen = tokenizer.get_vocab_size()
        if chosen < size:  # the text ran out of pieces to learn
            break
    words = sum(len(text.split()) for text in texts) * total / len(texts)
    return (
        chosen,
        f"the largest of {', '.join(map(str, VOCAB_SIZES))} whose median piece occurs {MEDIAN_COUNT}+ times in the {words:,.0f} words of the training text",
    )


def length_limit(lengths: Iterable[int], percentile: float = 99.5) -> tuple[int, str]:
    """A sequence length limit that cuts only the longest (100 - ``percentile``)% of ``lengths``,
    rounded up to a multiple of 8, and (value, why)."""
    lengths = np.fromiter(lengths, dtype=np.int64)
    limit = int(math.ceil(np.percentile(lengths, percentile) / 8) * 8)
    return (
        max(8, limit),
        f"the {percentile}th percentile of {len(lengths):,} training lengths is {np.percentile(lengths, percentile):.0f}; longest {lengths.max()}",
    )


def length_buckets(lengths: list[int], batch_size: int, generator: torch.Generator, pool: int) -> list[list[int]]:
    """Shuffled batches of similar-length items: each run of ``pool`` batches of a random order is
    sorted by length and cut into batches, and the batches are shuffled, so padding is small and the
    order still differs every epoch (``generator`` is seeded by seed and epoch)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), pool * batch_size):
        chunk = sorted(order[start : start + pool * batch_size], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


def derive_seed(seed: int, *places: int) -> int:
    """One seed from a run's seed and the place of what it seeds (an epoch; an epoch and a batch):
    the same place draws the same after a resume, and different places draw independently."""
    for place in places:
        seed = seed * 1_000_003 + place
    return seed


def seeded_generator(seed: int, *places: int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`: the order of an epoch, the draws of a batch."""
    return torch.Generator().manual_seed(derive_seed(seed, *places))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """The global CPU generator, forked and seeded for the block: torchvision's and torchaudio's random
    transforms draw from it, so a batch seeded by its number replays exactly on resume, and the
    model's own random stream continues as if the block had not run. Only the CPU generator is
    seeded: torch.manual_seed also queues a seed for every CUDA device, each with a stack trace."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def pad_rows(rows: list[list[int]], value: int) -> Tensor:
    """Rows of ids as one (len(rows), longest) long tensor, ``value`` after each row's end: one
    tensor of all the ids and one masked write, where a copy per row costs ~10 µs each."""
    lengths = torch.tensor([len(row) for row in rows])
    out = torch.full((len(rows), int(lengths.max())), value, dtype=torch.long)
    out[torch.arange(out.size(1)) < lengths[:, None]] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    return out


def list_column(rows: pa.Table, column: str) -> tuple[Tensor, list[int]]:
    """A list column of an Arrow table (``with_format("arrow")``) as one tensor of all its values and
    each row's bounds in it, row i being values[bounds[i]:bounds[i + 1]]: read at once, where datasets'
    numpy formatting converts row by row."""
    array = rows[column].combine_chunks()
    values = torch.from_numpy(array.flatten().to_numpy(zero_copy_only=False, writable=True))
    offsets = array.offsets.to_numpy()
    return values, (offsets - offsets[0]).tolist()
