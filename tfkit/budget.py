"""A run that fits the time the user has: ``train.minutes`` (``tfkit train --time 20m``).

Before the first step a probe times a few training steps and one validation on a throwaway copy of
the model, so the run's own weights, optimiser and random streams stay as they were. The schedule is
then planned for the budget: as many steps as fit beside ``EVALUATIONS`` validations and the last one,
a warmup of at most a tenth of them, and a checkpoint at each validation, so the best is kept. If the
run falls behind the plan (a slower phase of the machine), the loop stops early, in time for the last
validation. The budget counts training and evaluation, from the first step: data preparation, shown
before it, is not counted.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from tfkit.errors import UsageError
from tfkit.nn.linear import packed_weights
from tfkit.optim import build_optimizer
from tfkit.recipe import Recipe

PROBE_STEPS = 6  # timed optimiser steps; the first, which warms caches and allocators up, is not counted
EVALUATIONS = 5  # validations a planned run makes before its last one
LONG_RUN = 600.0  # seconds: a run without a budget that will take longer says so once, with how to ask for less


def parse_duration(text: str) -> float:
    """``20m``, ``1h30m``, ``90s``, ``1.5h`` or a bare number of minutes → minutes."""
    units = {"h": 60.0, "m": 1.0, "s": 1 / 60}
    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise UsageError(f"--time {text!r} is not a duration (write it as 20m, 1h30m, 90s or 1.5h)")
    return sum(float(number) * units[unit] for number, unit in parts)


def spoken(seconds: float) -> str:
    """3 h 05 min, 12 min, 45 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class Probe:
    step_seconds: float  # one optimiser step, accumulation included
    eval_seconds: float  # one validation


def probe(
    recipe: Recipe, model: nn.Module, cfg: dict[str, Any], device: torch.device, autocast: Callable[[], AbstractContextManager]
) -> Probe:
    """Time PROBE_STEPS training steps and one validation on a copy of ``model``."""
    twin = copy.deepcopy(model)
    optimizer = build_optimizer(twin, cfg)
    batches = itertools.chain.from_iterable(recipe.train_batches(epoch) for epoch in itertools.count())
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        twin.train()
        for _ in range(PROBE_STEPS):
            start = time.perf_counter()
            for batch in itertools.islice(batches, cfg["accumulate"]):
                with autocast():
                    loss = recipe.loss(twin, {k: v.to(device) for k, v in batch.items()})
                loss.value([count for _, count in loss.terms]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad(), autocast(), packed_weights():  # as Trainer.evaluate runs a validation
            twin.eval()
            outputs = recipe.eval_outputs(twin, "validation")
            recipe.score("validation", [outputs[place] for place in sorted(outputs)])
        eval_seconds = time.perf_counter() - start
    return Probe(sorted(times[1:])[len(times[1:]) // 2], eval_seconds)


def plan(cfg: dict[str, Any], seconds_left: float, measured: Probe) -> dict[str, Any]:
    """The train keys that fit ``seconds_left``: steps, warmup, eval_every and save_every."""
    evaluations = (EVALUATIONS if cfg["eval_every"] else 0) + 1
    steps = int((seconds_left - evaluations * measured.eval_seconds) / measured.step_seconds)
    if steps < 1:
        raise UsageError(
            f"train.minutes {cfg['minutes']:g} leaves no time to train: a step takes {measured.step_seconds:.2f} s and "
            f"a validation {measured.eval_seconds:.1f} s on this machine (give more minutes)"
        )
    every = max(1, steps // EVALUATIONS) if cfg["eval_every"] else 0
    return {"steps": steps, "warmup": min(cfg["warmup"], max(1, steps // 10)), "eval_every": every, "save_every": every or steps}
