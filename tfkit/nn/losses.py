"""The output layer and its loss in one pass, without keeping the logits.

A vocabulary-sized output layer makes (tokens, vocabulary) logits: at 2,048 tokens and 8,000 words
that is 64 MB in fp32, written by the matmul, read by log-softmax, kept for backward and read again
there. :func:`linear_cross_entropy` instead works through the tokens a chunk at a time: each chunk's
logits stay in cache while its loss and its gradients (to the hidden states and to the weights) are
computed, and backward only scales the gradients it was handed. The matmuls are the same three an
unfused layer runs; what goes is the memory traffic of the elementwise passes over the logits
(the idea of Liger-Kernel's fused linear cross-entropy and of Wijmans et al., 2025, "Cut Your Losses").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 512  # tokens per chunk: 512 × 8,000 fp32 logits is 16 MB, about a core's share of cache


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, smoothing: float) -> Tensor:
        device = hidden.device.type
        # under autocast the matmuls run in its dtype, as F.linear's would; softmax and sums in fp32
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, len(hidden), CHUNK):
                h, t = hidden[start : start + CHUNK].to(dtype), targets[start : start + CHUNK]
                logits = (h @ w.t()).float()
                kept = t != ignore_index
                t = t.masked_fill(~kept, 0)
                log_norm = logits.logsumexp(-1)
                # (1 - ε)·(log Z - logit[target]) + ε·(log Z - mean logit): smoothing spreads ε evenly
                loss = log_norm - (1 - smoothing) * logits.gather(1, t[:, None]).squeeze(1) - smoothing * logits.mean(-1)
                total += loss.masked_fill(~kept, 0).sum()
                # d loss / d logits = softmax - (1 - ε)·one-hot(target) - ε/V, and nothing for ignored rows
                grad = logits.sub_(log_norm[:, None]).exp_().sub_(smoothing / len(w))
                grad.scatter_add_(1, t[:, None], grad.new_full((len(t), 1), smoothing - 1)).mul_(kept[:, None])
                grad = grad.to(dtype)
                grad_hidden[start : start + CHUNK] = grad @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """Label-smoothed cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, summed
    over the targets that are not ``ignore_index``: ``F.cross_entropy(F.linear(hidden, weight),
    targets, ignore_index=..., label_smoothing=..., reduction="sum")``, in chunks (see the module).
    hidden (N, D), weight (V, D), targets (N,). Without gradients it is that plain expression."""
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, label_smoothing)
