"""Causal language modelling with the decoder-only Transformer (GPT; Radford et al., 2018, 2019).

Read from the bottom up: ``families`` (near-duplicate documents grouped, and splits that keep a
family whole), ``data`` (byte-level BPE, END_OF_TEXT, the bytes behind each token; the built-in
standard-library source and user text as documents, and their token streams), ``model`` (the
Transformer and the LSTM baseline, one interface), ``generate`` (sampling over the KV cache),
``interop`` (Hugging Face GPT-2 and Llama folders, the ONNX graph), then ``recipe`` (``causal-lm``:
blocks, loss, perplexity, bits per byte, predict, inspect). Nothing imports upwards.
"""

from tfkit.recipes.causal_lm import recipe  # noqa: F401  (it registers the recipe)
from tfkit.recipes.causal_lm.data import END_OF_TEXT, token_bytes, train_byte_bpe
from tfkit.recipes.causal_lm.generate import generate, sample_next
from tfkit.recipes.causal_lm.model import CausalLM, LSTMLanguageModel

__all__ = ["END_OF_TEXT", "CausalLM", "LSTMLanguageModel", "generate", "sample_next", "token_bytes", "train_byte_bpe"]
