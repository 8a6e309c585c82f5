"""Near-duplicate families, and held-out splits that take a family whole or not at all.

A file-level split leaks when files are near-copies of one another: the standard library's
``encodings/`` holds dozens of codecs generated from one template that differ only in a table, so a
codec held out for test had its siblings in training, and the model scored on it partly recalled
them. Documents are therefore grouped first: two documents are near-duplicates when the Jaccard
similarity of their sets of word 3-grams (Broder's shingles, 1997; 3 rather than 5 words, as a
two-line codec stub that repeats its name on every line changes most 5-grams) is at least THRESHOLD, estimated
by MinHash over PERMUTATIONS hash functions and found without comparing every pair by
locality-sensitive hashing (``datasketch``); a family is a connected group of near-duplicates (pairs
chain). At 0.3 the built-in corpus's 577 files make 461 families: the charmap codecs two (52
and 17 files, their generator's two styles), the CJK codec stubs one (24), and unrelated modules stay
apart (tests/test_causal_lm.py checks
the built-in split with another measure, shared lines). Families are then dealt to validation and test, in a seeded order,
while they fit the held-out share; a family too large to fit stays in training, so held-out text is
never a near-copy of training text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

THRESHOLD = 0.3  # word-3-gram Jaccard at which two documents are one family
SHINGLE_WORDS = 3
PERMUTATIONS = 128


def shingles(text: str) -> list[bytes]:
    """The distinct word SHINGLE_WORDS-grams of ``text`` (all its words, if it has fewer)."""
    words = text.split()
    n = min(SHINGLE_WORDS, len(words))
    return list({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})


def signatures(texts: Iterable[str]) -> Iterator[LeanMinHash]:
    """One MinHash signature per text, read as a stream (a corpus larger than memory is fine)."""
    for sketch in MinHash.generator((shingles(text) for text in texts), num_perm=PERMUTATIONS):
        yield LeanMinHash(sketch)


def families(sketches: list[LeanMinHash]) -> np.ndarray:
    """Each document's family, numbered by its first member: LSH proposes candidate pairs, each is
    kept when its estimated Jaccard is at least THRESHOLD (LSH alone admits some below), and pairs
    are joined into families by union-find."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=PERMUTATIONS)
    for i, sketch in enumerate(sketches):
        lsh.insert(i, sketch, check_duplication=False)
    parent = list(range(len(sketches)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, sketch in enumerate(sketches):
        for j in lsh.query(sketch):
            if j != i and sketch.jaccard(sketches[j]) >= THRESHOLD:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(sketches))])


def split_by_family(labels: np.ndarray, seed: int, held_out: float) -> dict[str, list[int]]:
    """Document indices per split: families in a seeded order go to validation, then test, while
    each fits in ``held_out`` of the documents (at least one); the rest, and any family too large
    for a held-out split, to train."""
    count = len(labels)
    size = max(1, int(round(held_out * count)))
    members: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        members.setdefault(label, []).append(i)
    order = list(members.values())
    random.Random(seed).shuffle(order)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for family in order:
        room = [s for s in ("validation", "test") if len(parts[s]) + len(family) <= size]
        parts[room[0] if room else "train"].extend(family)
    return {s: sorted(p) for s, p in parts.items()}


def split_documents(texts: Iterable[str], seed: int, held_out: float) -> dict[str, list[int]]:
    """``texts`` (read once, in order) split into train, validation and test by near-duplicate family."""
    return split_by_family(families(list(signatures(texts))), seed, held_out)
