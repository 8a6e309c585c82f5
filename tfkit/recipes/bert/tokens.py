"""BERT's vocabulary conventions: the special tokens at fixed ids, ``[CLS] A [SEP] B [SEP]`` inputs, and
the tokenizer a run or a Hugging Face folder carries."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from tfkit.errors import UsageError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))


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
