"""Linear layers whose CPU inference runs on weights packed once for oneDNN.

PyTorch's CPU linear hands MKL the weight as it is stored, and MKL repacks it on every call: at the
32 rows of a decoding step that costs as much as the product (the 8000-word output layer of the
benchmark: 1.3 ms a step as stored, 0.63 ms packed). Inside :func:`packed_weights`, fp32 linear
layers on the CPU without gradients run on weights reordered once into oneDNN's blocked layout (the
packing torch.compile's CPU weight freezing does), with the activation fused where there is one.
Everywhere else (autograd, autocast, other devices and dtypes) they are ``F.linear``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# a packed product costs ~20 µs more per call to start; below this many weights that is more than it saves
PACK_ABOVE = 1 << 16
# nor at one or two rows (a causal LM's decoding step), where MKL's matrix-vector product packs
# nothing: 256→768 at 1 row took 20 µs as stored, 40 packed; 256→8000 at 4 rows 909 µs, 480 packed
PACK_ROWS = 4
# weight id and rows → (the weight, kept so its id stays its own, and its packed copy)
_packs: dict[tuple[int, int | None, int | None], tuple[Tensor, Tensor]] | None = None


def _packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@contextmanager
def packed_weights() -> Iterator[None]:
    """Within this block, CPU linear layers pack each weight the first time they use it and reuse the
    pack until the block ends, so the weights must not change inside it. Nested blocks share the
    outermost block's packs."""
    global _packs
    if _packs is not None or not _packing_available():
        yield
        return
    _packs = {}
    try:
        yield
    finally:
        _packs = None


def _fused(activation: nn.Module | None) -> tuple[str, str] | None:
    """oneDNN's name and algorithm for an activation it can apply inside the product."""
    if activation is None:
        return "none", ""
    if isinstance(activation, nn.ReLU):
        return "relu", ""
    if isinstance(activation, nn.GELU):
        return "gelu", activation.approximate
    if isinstance(activation, nn.SiLU):
        return "swish", ""
    return None


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, rows: slice | None = None, activation: nn.Module | None = None
) -> Tensor:
    """activation(x·Wᵀ + b), with W and b the given ``rows`` of ``weight`` and ``bias`` (all by default)."""
    whole, part = weight, (None, None)
    if rows is not None:
        part = (rows.start, rows.stop)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    fused = _fused(activation)
    if (
        _packs is None
        or fused is None
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or torch.is_autocast_enabled("cpu")
        or weight.numel() <= PACK_ABOVE
        or x.numel() < PACK_ROWS * x.size(-1)
    ):
        out = F.linear(x, weight, bias)
        return out if activation is None else activation(out)
    key = (id(whole), *part)
    if key not in _packs:
        _packs[key] = (whole, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()))
    return torch.ops.mkldnn._linear_pointwise(x, _packs[key][1], bias, fused[0], [], fused[1])


class Linear(nn.Linear):
    """``nn.Linear`` through :func:`linear`, optionally with its activation: packed inside
    :func:`packed_weights`."""

    def forward(self, x: Tensor, activation: nn.Module | None = None) -> Tensor:
        return linear(x, self.weight, self.bias, activation=activation)
