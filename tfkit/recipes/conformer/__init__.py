"""Speech recognition with the Conformer and CTC.

Reading order: ``recipe`` (the hooks: preparing the speech, training batches, the CTC loss,
decoding, CER/WER), then ``model`` (log-mel features, the Conformer-CTC model assembled from
registry parts), ``data`` (user recordings, the built-in corpus: eSpeak NG's English voices, its
test speakers and its held-out channel; the CTC characters), ``augment`` (speed, rooms, noise
colours, the telephone channel, vocal-tract-length warping, SpecAugment), ``espeak`` (the
synthesizer behind the built-in corpus) and ``interop`` (ONNX).
"""

from tfkit.recipes.conformer.recipe import Conformer

__all__ = ["Conformer"]
