"""Causal language modelling with the decoder-only Transformer (GPT; Radford et al., 2018, 2019).

Read from the bottom up: ``tokens`` (byte-level BPE, END_OF_TEXT, the bytes behind each token) and
``corpus`` (the built-in standard-library source and user text, as documents), ``model`` (the
Transformer and the LSTM baseline, one interface), ``generate`` (sampling over the KV cache), ``hf``
(Hugging Face GPT-2 folders), then ``recipe`` (``causal-lm``: blocks, loss, perplexity, bits per byte,
predict, inspect). Nothing imports upwards.
"""

from tfkit.recipes.causal_lm import recipe  # noqa: F401  (it registers the recipe)
from tfkit.recipes.causal_lm.generate import generate, sample_next
from tfkit.recipes.causal_lm.model import CausalLM, LSTMLanguageModel
from tfkit.recipes.causal_lm.tokens import END_OF_TEXT, token_bytes, train_byte_bpe

__all__ = ["END_OF_TEXT", "CausalLM", "LSTMLanguageModel", "generate", "sample_next", "token_bytes", "train_byte_bpe"]
