"""Byte-level BPE (GPT-2's): every byte is a base token, so any text round-trips and each token stands
for known bytes (what bits per byte divide by). Documents are separated by END_OF_TEXT."""

from __future__ import annotations

import codecs
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tfkit.errors import UsageError

END_OF_TEXT = "<|endoftext|>"  # between documents; tfkit's tokenizers give it id 0, GPT-2's 50256


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
