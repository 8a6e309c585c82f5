"""Search over model outputs: greedy and beam search with a KV cache for encoder-decoders, and greedy
and prefix beam search over CTC posteriors.

An encoder-decoder provides ``encode(src) -> (memory, memory_mask)``, ``decoder.new_cache(max_len)`` and
``decode(tokens, memory, memory_mask, cache, offset) -> logits``; with a cache, each step feeds only
the newest token and attends to the cached keys and values of the earlier ones. Beam search gives
``decode`` each sentence's memory once for its ``beam`` consecutive rows of tokens (the decoder's
cross-attention groups them: :class:`tfkit.nn.attention.MultiHeadAttention`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn

from tfkit.nn.linear import packed_weights


@torch.no_grad()
@packed_weights()
def greedy_search(model: nn.Module, src: Tensor, bos: int, eos: int, max_len: int) -> list[list[int]]:
    """The most likely next token at each step, until EOS or ``max_len`` tokens; (B, S) → B lists."""
    memory, memory_mask = model.encode(src)
    cache = model.decoder.new_cache(max_len)
    batch = src.size(0)
    token = torch.full((batch,), bos, dtype=torch.long, device=src.device)
    steps, finished = [], torch.zeros(batch, dtype=torch.bool, device=src.device)
    for t in range(max_len):
        logits = model.decode(token[:, None], memory, memory_mask, cache, offset=t)[:, -1]
        token = logits.argmax(-1)
        steps.append(token)
        finished |= token == eos
        if finished.all():
            break
    return [_until(row, eos) for row in torch.stack(steps, 1).tolist()]


@torch.no_grad()
@packed_weights()
def beam_search(
    model: nn.Module, src: Tensor, bos: int, eos: int, max_len: int, beam: int, length_penalty: float = 1.0
) -> list[list[int]]:
    """Keep the ``beam`` best prefixes per sentence; hypotheses are ranked by log p / length^α.

    Each step looks at the 2·beam best extensions: EOS among the top ``beam`` ends a hypothesis, the
    best ``beam`` others go on. A sentence keeps its ``beam`` best ended hypotheses and is done once its
    best live prefix, ended at the next step, could not beat the worst of them (Hugging Face's rule;
    stopping at the first ``beam`` ended ones, as fairseq does, often loses the greedy answer).
    With beam 1 and no length penalty this is exactly greedy search.
    """
    batch, device = src.size(0), src.device
    memory, memory_mask = model.encode(src)  # shared by a sentence's beams (MultiHeadAttention's groups)
    cache = model.decoder.new_cache(max_len)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first
    prefixes = torch.full((batch * beam, 0), bos, dtype=torch.long, device=device)
    token = torch.full((batch * beam,), bos, dtype=torch.long, device=device)
    ended = [_Best(beam) for _ in range(batch)]
    done = [False] * batch
    rank = torch.arange(2 * beam, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * beam
    for t in range(max_len):
        logits = model.decode(token[:, None], memory, memory_mask, cache, offset=t)[:, -1]
        log_probs = logits.float().log_softmax(-1)  # (B·K, V)
        vocab = log_probs.size(-1)
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam * vocab)
        top_scores, top = candidates.topk(2 * beam, dim=1)  # (B, 2K)
        source_beam, next_token = top // vocab, top % vocab
        is_eos = next_token == eos

        rows = offsets + source_beam  # (B, 2K): each candidate's row in the flattened batch
        # a -inf candidate is an unused beam slot (fewer live prefixes than beams), never a hypothesis.
        # The step's ended hypotheses come to the host together, not two copies per hypothesis: each
        # copy from a GPU waits for it.
        sentences, slots = (is_eos & (rank < beam) & top_scores.isfinite()).nonzero().unbind(1)
        if len(sentences):
            ended_scores = (top_scores[sentences, slots] / (t + 1) ** length_penalty).tolist()
            ended_prefixes = prefixes[rows[sentences, slots]].tolist()
            for sentence, score, tokens in zip(sentences.tolist(), ended_scores, ended_prefixes):
                if not done[sentence]:
                    ended[sentence].add(score, tokens)

        # the first `beam` candidates that are not EOS go on
        keep = (is_eos.long() * 2 * beam + rank).argsort(dim=1)[:, :beam]
        scores = top_scores.gather(1, keep)
        best_live = (scores[:, 0] / (t + 2) ** length_penalty).tolist()
        done = [d or ended[b].beats(best_live[b]) for b, d in enumerate(done)]
        if all(done):
            break
        rows = rows.gather(1, keep).view(-1)
        token = next_token.gather(1, keep).view(-1)
        prefixes = torch.cat([prefixes[rows], token[:, None]], dim=1)
        for self_cache, _ in cache:  # cross-attention caches hold each sentence once, for all its beams
            self_cache.reorder(rows)
    else:  # out of length: the live prefixes are hypotheses too
        live = prefixes.view(batch, beam, -1).tolist()
        for b, (sentence_scores, sentence_prefixes) in enumerate(zip(scores.tolist(), live)):
            for score, tokens in zip(sentence_scores, sentence_prefixes):
                if not done[b] and math.isfinite(score):
                    ended[b].add(score / max_len**length_penalty, tokens)
    return [hyps.best() for hyps in ended]


class _Best:
    """The ``size`` best-scoring ended hypotheses of one sentence."""

    def __init__(self, size: int):
        self.size = size
        self.hyps: list[tuple[float, list[int]]] = []

    def add(self, score: float, tokens: list[int]) -> None:
        self.hyps.append((score, tokens))
        self.hyps.sort(key=lambda h: -h[0])
        del self.hyps[self.size :]

    def beats(self, score: float) -> bool:
        return len(self.hyps) == self.size and self.hyps[-1][0] >= score

    def best(self) -> list[int]:
        return self.hyps[0][1]


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def ctc_greedy(log_probs: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: the most likely token per frame, repeats merged, blanks dropped; (B, T, V) → B lists."""
    out = []
    for path, length in zip(log_probs.argmax(-1).cpu(), lengths.tolist()):
        merged = torch.unique_consecutive(path[:length])
        out.append(merged[merged != blank].tolist())
    return out


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(log_probs: Tensor, beam: int, blank: int = 0, token_min_log_prob: float = -12.0) -> list[int]:
    """The most likely label sequence of one utterance's (T, V) log posteriors, summing over every
    frame alignment of each prefix (Hannun et al., 2014). Each prefix keeps two scores, ending in blank
    and ending in a label, because a repeated label only extends the prefix after a blank. Tokens
    rarer than ``token_min_log_prob`` in a frame are not tried there."""
    neg_inf = -math.inf
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg_inf)}  # prefix → (ends in blank, in label)
    for row in log_probs.float().cpu().tolist():
        tokens = [c for c, p in enumerate(row) if c != blank and p >= token_min_log_prob]
        grown: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [neg_inf, neg_inf])
        for prefix, (ends_blank, ends_label) in beams.items():
            total = _log_add(ends_blank, ends_label)
            stay = grown[prefix]
            stay[0] = _log_add(stay[0], total + row[blank])
            last = prefix[-1] if prefix else None
            for c in tokens:
                extended = grown[prefix + (c,)]
                if c == last:
                    extended[1] = _log_add(extended[1], ends_blank + row[c])  # "a _ a": a second a
                    stay[1] = _log_add(stay[1], ends_label + row[c])  # "a a": still one a
                else:
                    extended[1] = _log_add(extended[1], total + row[c])
        ranked = sorted(grown.items(), key=lambda item: _log_add(*item[1]), reverse=True)
        beams = {prefix: (b, n) for prefix, (b, n) in ranked[:beam]}
    return list(max(beams, key=lambda prefix: _log_add(*beams[prefix])))
