"""Greedy and beam search: against full recomputation and against exhaustive search."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tfkit import run as runs
from tfkit.decode import beam_search, greedy_search
from tfkit.recipes.translation import Seq2SeqTransformer

BOS, EOS = 2, 3


def random_translator(seed: int = 0) -> nn.Module:
    """An untrained Seq2SeqTransformer from the translation recipe: arbitrary but fixed outputs."""
    torch.manual_seed(seed)
    encoder = {"block": "post_ln", "layers": 2}
    decoder = {"block": "post_ln_decoder", "layers": 2}
    return Seq2SeqTransformer(12, 32, 4, 64, 0.0, "relu", "sinusoidal", encoder, decoder).eval()


def sources() -> torch.Tensor:
    src = torch.randint(4, 12, (5, 7), generator=torch.Generator().manual_seed(1))
    src[1, 4:] = 0  # padding
    src[3, 2:] = 0
    return src


def test_greedy_with_cache_equals_recomputing_the_whole_prefix():
    model, src = random_translator(), sources()
    got = greedy_search(model, src, BOS, EOS, max_len=9)
    memory, mask = model.encode(src)
    for row, hyp in enumerate(got):
        prefix = [BOS]
        for _ in range(9):
            logits = model.decode(torch.tensor([prefix]), memory[row : row + 1], mask[row : row + 1])
            token = int(logits[0, -1].argmax())
            if token == EOS:
                break
            prefix.append(token)
        assert hyp == prefix[1:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_is_greedy(seed):
    model, src = random_translator(seed), sources()
    greedy = greedy_search(model, src, BOS, EOS, 9)
    assert beam_search(model, src, BOS, EOS, 9, beam=1, length_penalty=0.0) == greedy


class TableModel(nn.Module):
    """log p(next | last token, step) read from a fixed random table, with the decoder interface."""

    def __init__(self, vocab: int, steps: int):
        super().__init__()
        self.table = torch.randn(steps, vocab, vocab, generator=torch.Generator().manual_seed(3)) * 2
        self.decoder = self

    def encode(self, src):
        return src.float()[:, :, None], torch.ones_like(src, dtype=torch.bool)

    def new_cache(self, length):
        return []

    def decode(self, tokens, memory, memory_mask, cache, offset):
        return self.table[offset][tokens[:, -1]][:, None]


def exhaustive_best(model: TableModel, vocab: int, max_len: int, alpha: float) -> list[int]:
    best, best_score = None, float("-inf")
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                continue  # ended early without EOS, or went on after it
            prev, total = BOS, 0.0
            for t, token in enumerate(seq):
                total += model.table[t][prev].log_softmax(-1)[token].item()
                prev = token
            score = total / n**alpha
            if score > best_score:
                best, best_score = list(seq[:-1] if seq[-1] == EOS else seq), score
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_a_wide_beam_finds_the_exhaustive_optimum(alpha):
    vocab, max_len = 5, 3
    model = TableModel(vocab, max_len)
    (got,) = beam_search(model, torch.zeros(1, 1), BOS, EOS, max_len, beam=80, length_penalty=alpha)
    assert got == exhaustive_best(model, vocab, max_len, alpha)


def test_beam_search_on_a_trained_model_is_at_least_as_good_as_greedy(trained_run):
    recipe, model = runs.open_run(trained_run)
    recipe.prepare(trained_run)
    greedy = recipe.evaluate(model, "test", beam=1)
    beam = recipe.evaluate(model, "test", beam=4)
    assert beam["exact_match"] >= greedy["exact_match"] - 1, (beam, greedy)
