"""The optimiser, its learning-rate schedule and the autocast dtype of ``train:``, shared by the
trainer, the time budget's probe and any recipe that trains peers at the same budget."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` means bf16 on CUDA and fp32 on CPU, where
    low-precision matmuls are far slower than fp32 on most processors."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    # weight decay on matrices only, not on biases, norms or position tables of rank 1
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}  # the names are checked with the config
    return optimizers[cfg["optimizer"]](groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])


def lr_factor(cfg: dict[str, Any]) -> Callable[[int], float]:
    """Multiplier of the peak ``train.lr`` after ``step`` optimiser steps.

    noam: the paper's d^-0.5·min(s^-0.5, s·w^-1.5), written as peak·min(s/w, √(w/s)) so the peak is
    explicit; warmup_cosine: linear warmup, then cosine decay to zero at ``train.steps``;
    constant: linear warmup, then flat.
    """
    warmup, total, kind = max(1, cfg["warmup"]), cfg["steps"], cfg["schedule"]

    def noam(step: int) -> float:
        s = step + 1
        return min(s / warmup, math.sqrt(warmup / s))

    def warmup_cosine(step: int) -> float:
        s = step + 1
        if s < warmup:
            return s / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def constant(step: int) -> float:
        return min(1.0, (step + 1) / warmup)

    return {"noam": noam, "warmup_cosine": warmup_cosine, "constant": constant}[kind]
