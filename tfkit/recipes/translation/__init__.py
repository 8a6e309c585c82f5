"""Translation with the original encoder-decoder Transformer (Vaswani et al., 2017).

Shared BPE vocabulary and tied embeddings, sinusoidal positions, post-LN blocks with ReLU
feed-forwards, label smoothing, the warmup schedule, teacher forcing; greedy and beam search with a
KV cache; exact match, chrF and BLEU with sacrebleu. Positions and the blocks' parts are registry
names, so the same recipe trains e.g. a pre-LN model with rotary positions and gated feed-forwards.

Read from the bottom up: ``data`` (the built-in corpus of numbers in words, readers of the user's
pairs), ``model`` (the Transformer and its ONNX graphs), ``interop`` (transformers Marian folders
out and in, ONNX graphs), then ``recipe`` (``translation``: its hooks). Nothing imports upwards.
"""

from tfkit.recipes.translation import recipe  # noqa: F401  (it registers the recipe)
from tfkit.recipes.translation.data import BOS, EOS, PAD, SPECIALS, UNK
from tfkit.recipes.translation.model import MAX_POSITIONS, Seq2SeqTransformer
from tfkit.recipes.translation.recipe import Translation

__all__ = ["BOS", "EOS", "MAX_POSITIONS", "PAD", "SPECIALS", "UNK", "Seq2SeqTransformer", "Translation"]
