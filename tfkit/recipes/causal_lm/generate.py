"""Generation: one forward pass per new token over the KV cache (or the LSTM's state), greedy at
temperature 0, else sampled from the softmax cut by top-k and top-p, from a seeded generator; tokens
already in the text can be made less likely (CTRL's repetition penalty)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from tfkit.recipes.causal_lm.model import CausalLM


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """The next token from (V,) logits: the most likely at temperature 0; else drawn from the softmax at
    ``temperature`` over the ``top_k`` most likely tokens whose cumulative probability first reaches ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    values, indices = logits.float().topk(min(top_k, logits.numel()))
    probs = (values / temperature).softmax(-1)
    keep = probs.cumsum(-1) - probs < top_p  # the smallest set reaching top_p (the first always stays)
    probs = probs * keep
    return int(indices[torch.multinomial(probs / probs.sum(), 1, generator=generator)])


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019) on (V,) logits: where ``seen`` (V,) is True, a
    positive logit is divided by ``penalty`` and a negative one multiplied, so above 1 both fall."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


@torch.no_grad()
def stream(
    model: CausalLM,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    stop: int,
    repetition_penalty: float = 1.0,
) -> Iterator[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens, yielding each as it is chosen (fewer at
    token ``stop``, END_OF_TEXT, or the model's last position)."""
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.max_positions - len(prompt))
    cache = model.new_cache(len(prompt) + budget)
    hidden = model(torch.tensor([prompt], device=device), cache)
    seen = torch.zeros(model.tokens.num_embeddings, dtype=torch.bool, device=device)
    seen[prompt] = True  # as CTRL and transformers: the prompt's tokens count as repeats too
    for _ in range(budget):
        logits = model.logits(hidden[0, -1])
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token == stop:
            return
        seen[token] = True
        yield token
        hidden = model(torch.tensor([[token]], device=device), cache)


def generate(
    model: CausalLM,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    stop: int,
    repetition_penalty: float = 1.0,
) -> list[int]:
    """The whole continuation of :func:`stream`."""
    return list(stream(model, prompt, max_new_tokens, temperature, top_k, top_p, generator, stop, repetition_penalty))
