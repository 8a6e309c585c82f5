"""The text a causal LM reads: byte-level BPE, documents, and the token stream they make.

Tokens: GPT-2's byte-level BPE, every byte a base token, so any text round-trips and each token
stands for known bytes (what bits per byte divide by); documents are separated by END_OF_TEXT.

Documents: the built-in corpus, the Python standard library's own source files (test suites left out),
split 90/5/5 by near-duplicate family (:mod:`families`) so a held-out file is neither seen nor a
near-copy of one seen; a user's .txt file, whose documents are separated by blank lines; a folder of
.txt files, one document per file, where a file that cannot be read or decoded is skipped and counted
(:class:`tfkit.data.Unusable`); both split by family too when they have no held-out splits of their own;
.jsonl/.csv rows or a Hugging Face dataset, one document per row. Each split's documents, each followed by END_OF_TEXT, are encoded
once into a file of int32 token ids under the cache folder and memory-mapped, so a corpus larger than
memory trains; the file is named by the tokenizer and the documents' text, so a resumed run (or another
rank) reads the very same stream.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tfkit.data import (
    SPLITS,
    Unusable,
    cache_dir,
    cached,
    complete_splits,
    load_splits,
    read_lines,
    read_text,
    require_columns,
)
from tfkit.errors import UsageError
from tfkit.progress import Preparing
from tfkit.recipes.causal_lm import families

# -- tokens ---------------------------------------------------------------------------------------
END_OF_TEXT = "<|endoftext|>"  # between documents; tfkit's tokenizers give it id 0, GPT-2's 50256


def train_byte_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2's byte-level BPE: every byte is a base token, so any text round-trips; id 0 is END_OF_TEXT."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
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


class TextStream:
    """Token ids in, text out as soon as it is whole: a character whose UTF-8 bytes are split over
    several byte-level tokens is held back until its last byte arrives."""

    def __init__(self, table: list[bytes]):
        self.table = table
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.decoder.decode(self.table[token])

    def end(self) -> str:
        """What is left: a cut-off character as U+FFFD, as the tokenizer's decode writes it."""
        return self.decoder.decode(b"", final=True)


def end_of_text(tokenizer: Tokenizer, where: Path | str) -> int:
    found = tokenizer.token_to_id(END_OF_TEXT)
    if found is None:
        raise UsageError(f"the tokenizer of {where} has no {END_OF_TEXT} token (a byte-level BPE as GPT-2's is needed)")
    return found


def load_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json, or GPT-2's vocab.json and merges.txt (a byte-level BPE), as Hugging Face folders carry."""
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise UsageError(f"{folder} has no tokenizer.json, nor vocab.json and merges.txt")


# -- documents ------------------------------------------------------------------------------------
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "__pycache__"}
CHUNK = 1000  # documents read (and encoded) at a time


def stdlib_source(seed: int) -> datasets.DatasetDict:
    """The standard library's .py files (one document each, test suites left out), split 90/5/5 by
    near-duplicate family."""

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
        parts = families.split_documents(texts, seed, 0.05)
        return datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [texts[i] for i in parts[s]]}) for s in SPLITS})

    key = {"seed": seed, "python": sys.version.split()[0], "families": [families.THRESHOLD, families.SHINGLE_WORDS]}
    return cached("stdlib-source", key, build)


def by_family(documents: datasets.Dataset, texts: Iterable[str], seed: int, held_out: float) -> datasets.DatasetDict:
    """A source's only split, ``documents`` (``texts`` being their text, in order), cut into train,
    validation and test by near-duplicate family."""
    parts = families.split_documents(texts, seed, held_out)
    for split in ("validation", "test"):
        if not parts[split] or not parts["train"]:
            raise UsageError(f"the data has too few documents ({len(documents)}) to hold out a {split} split")
    return datasets.DatasetDict({s: documents.select(parts[s]) for s in SPLITS})


def readable_files(folder: Path) -> list[str]:
    """The .txt files under ``folder`` (subfolders too) that hold UTF-8 text, in sorted order; one
    that cannot be read or decoded is skipped and counted, and too many stop the run."""
    files = sorted(f for f in folder.rglob("*.txt") if f.is_file())
    if not files:
        raise UsageError(f"data folder {folder} holds no .txt files (one document each) and no train file")
    unusable, good = Unusable("files", str(folder)), []
    with Preparing(f"checking the {len(files):,} text files", total=len(files), unit="files") as shown:
        for path in files:
            try:
                raw = path.read_bytes()
                raw.decode("utf-8")
                good.append(str(path))
            except UnicodeDecodeError as e:
                unusable.skip(f"{path}: not UTF-8 text (byte {e.start})")
            except OSError as e:
                raw = b""
                unusable.skip(f"{path}: cannot be read ({e.strerror or type(e).__name__})")
            shown.advance(1, len(raw))
    unusable.report(len(files))
    return good


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


class Documents:
    """One split's documents, read ``CHUNK`` at a time: the text of a row's ``column``, or of the file
    it names; empty ones are left out."""

    def __init__(self, rows: datasets.Dataset, column: str, files: bool = False):
        self.rows, self.column, self.files = rows, column, files

    def chunks(self) -> Iterator[list[str]]:
        for chunk in self.rows.iter(batch_size=CHUNK):
            texts = [read_text(Path(v)) for v in chunk[self.column]] if self.files else chunk[self.column]
            yield [t for t in texts if isinstance(t, str) and t.strip()]

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks():
            yield from chunk

    def every_text(self) -> Iterator[str]:
        """Every row's text in order, an empty one too (so places match the rows)."""
        for chunk in self.rows.iter(batch_size=CHUNK):
            yield from ([read_text(Path(v)) for v in chunk[self.column]] if self.files else chunk[self.column])

    def sample(self, characters: int) -> tuple[list[str], int]:
        """About ``characters`` of the documents, every k-th one so the sample spans them all, and how
        many documents there are. Two passes: the documents are a stream, larger than memory."""
        count = total = 0
        for text in self:
            count, total = count + 1, total + len(text)
        step = max(1, total // characters)
        return [text for i, text in enumerate(self) if i % step == 0], count


def read_documents(data: dict[str, Any], seed: int) -> dict[str, Documents]:
    """``data.name`` as each split's documents; splits the source lacks are carved from its train
    documents (``data.held_out`` each), so no document is split between them."""
    path, held_out = Path(data["name"]).expanduser(), data["held_out"]
    if path.suffix == ".txt":
        documents = text_documents(path)["train"]
        splits = by_family(documents, documents["text"], seed, held_out)
        return {s: Documents(splits[s], "text") for s in SPLITS}
    if path.is_dir() and not any(f for s in SPLITS for f in path.glob(f"{s}.*")):
        files = datasets.Dataset.from_dict({"path": readable_files(path)})
        splits = by_family(files, Documents(files, "path", files=True).every_text(), seed, held_out)
        return {s: Documents(splits[s], "path", files=True) for s in SPLITS}
    split_texts = {s: f for s in SPLITS if (f := path / f"{s}.txt").is_file()} if path.is_dir() else {}
    if split_texts:  # train.txt and the others: documents between blank lines, as in one .txt file
        loaded = datasets.DatasetDict({s: text_documents(f)["train"] for s, f in split_texts.items()})
        if list(loaded) == ["train"]:
            splits = by_family(loaded["train"], loaded["train"]["text"], seed, held_out)
        else:
            splits = complete_splits(loaded, seed, held_out)
        return {s: Documents(splits[s], "text") for s in SPLITS}
    splits = load_splits(data["name"], lambda: stdlib_source(seed), seed, held_out=held_out, hub_config=data["hub_config"])
    for split in SPLITS:
        require_columns(splits[split], split, [data["text_column"]], "data.text_column")
    return {s: Documents(splits[s], data["text_column"]) for s in SPLITS}


def token_stream(documents: Documents, tokenizer: Tokenizer, end_of_text: int, split: str) -> np.ndarray:
    """The documents' tokens, each followed by ``end_of_text``, as a read-only memory-mapped (N,) int32
    array; encoded once per tokenizer and text."""
    digest = hashlib.sha1(tokenizer.to_str().encode())
    for text in documents:  # reading is fast next to encoding: name the file by the text itself
        digest.update(len(text).to_bytes(8, "little") + text.encode("utf-8", "surrogatepass"))
    path = cache_dir() / f"causal-lm-tokens-{digest.hexdigest()[:20]}.i32"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        count = 0
        try:
            with open(partial, "wb") as f:
                for chunk in documents.chunks():
                    for encoding in tokenizer.encode_batch(chunk):
                        f.write(np.asarray([*encoding.ids, end_of_text], dtype="<i4").tobytes())
                    count += len(chunk)
                f.flush()
                os.fsync(f.fileno())  # whole on disk before it is named: a resumed run must read this very stream
            if count == 0:
                raise UsageError(f"the {split} data holds no text")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return np.memmap(path, dtype="<i4", mode="r")
