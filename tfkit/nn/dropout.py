"""Dropout whose masks cost a quarter of a random number per element on the CPU.

PyTorch's CPU dropout draws one Bernoulli sample per element from the Mersenne Twister: about 9 ns
each, which at a small model's sizes is 15% of a training step. Here each 64-bit draw yields four
16-bit uniforms; an element is kept when its uniform clears round(p·65536), so the drop rate is p to
within 1/65536, and kept elements are scaled by exactly 65536 / (number of values kept), so the
expectation is the input's. The draws come from the global generator, whose state checkpoints save.
On CUDA PyTorch's fused Philox kernel is already fast and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return x  # F.dropout would return it too, after ~7 µs of checks: a decoding step makes dozens of calls
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    if p >= 1.0:
        return x * 0.0
    dropped = round(p * LEVELS)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # full 64-bit range
    uniform = bits.view(torch.int16)[: x.numel()].view(x.shape)
    keep = uniform >= dropped - LEVELS // 2  # the bool mask is all backward keeps
    return x * keep * (LEVELS / (LEVELS - dropped))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
