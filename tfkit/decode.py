"""Search over an encoder-decoder's outputs: greedy and beam search with a KV cache.

The model provides ``encode(src) -> (memory, memory_mask)``, ``decoder.new_cache()`` and
``decode(tokens, memory, memory_mask, cache, offset) -> logits``; with a cache, each step feeds only
the newest token and attends to the cached keys and values of the earlier ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def greedy_search(model: nn.Module, src: Tensor, bos: int, eos: int, max_len: int) -> list[list[int]]:
    """The most likely next token at each step, until EOS or ``max_len`` tokens; (B, S) → B lists."""
    memory, memory_mask = model.encode(src)
    cache = model.decoder.new_cache()
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
def beam_search(
    model: nn.Module, src: Tensor, bos: int, eos: int, max_len: int, beam: int, length_penalty: float = 1.0
) -> list[list[int]]:
    """Keep the ``beam`` best prefixes per sentence; hypotheses are ranked by log p / length^α.

    As in fairseq, each step looks at the 2·beam best extensions: EOS among the top ``beam`` ends a
    hypothesis, the best ``beam`` others go on; a sentence is done once it has ``beam`` hypotheses.
    With beam 1 this is exactly greedy search.
    """
    batch, device = src.size(0), src.device
    memory, memory_mask = model.encode(src)
    memory, memory_mask = memory.repeat_interleave(beam, 0), memory_mask.repeat_interleave(beam, 0)
    cache = model.decoder.new_cache()
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first
    prefixes = torch.full((batch * beam, 0), bos, dtype=torch.long, device=device)
    token = torch.full((batch * beam,), bos, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
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
        for b, j in (is_eos & (rank < beam)).nonzero().tolist():
            if len(finished[b]) < beam:
                score = top_scores[b, j].item() / (t + 1) ** length_penalty
                finished[b].append((score, prefixes[rows[b, j]].tolist()))
        if all(len(hyps) >= beam for hyps in finished):
            break

        # the first `beam` candidates that are not EOS go on
        keep = (is_eos.long() * 2 * beam + rank).argsort(dim=1)[:, :beam]
        scores = top_scores.gather(1, keep)
        rows = rows.gather(1, keep).view(-1)
        token = next_token.gather(1, keep).view(-1)
        prefixes = torch.cat([prefixes[rows], token[:, None]], dim=1)
        for self_cache, _ in cache:  # cross-attention caches are the same for every beam of a sentence
            self_cache.reorder(rows)

    for b in range(batch):  # out of length: the live beams are candidates too
        if len(finished[b]) < beam:
            for k in range(beam):
                finished[b].append((scores[b, k].item() / max_len**length_penalty, prefixes[b * beam + k].tolist()))
    return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
