"""Speech recognition with the Conformer and CTC.

Reading order: ``augment`` (speed, rooms, noise colours, the telephone channel, vocal-tract-length
warping), ``speech`` (the built-in corpus: eSpeak NG's English voices, its test speakers and its
held-out channel), ``recipe`` (features, SpecAugment, the model, training batches, decoding, CER/WER).
"""

from tfkit.recipes.conformer.recipe import Conformer

__all__ = ["Conformer"]
