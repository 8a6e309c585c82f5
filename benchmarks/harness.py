"""How a benchmark row is measured: its two sides (tfkit's and the peer's) on the chosen device and
precision, median times over alternating calls, peak tensor memory, and the FLOP/s that MFU is
reported against. run.py's docstring gives the method in full."""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


@dataclass
class Side:
    """One implementation of a row: ``call`` does one timed unit of work (a training step, a decode)."""

    name: str
    call: Callable[[], Any]
    resident: Callable[[], int]  # tensor bytes that live between calls, once warmed up


@dataclass
class Row:
    name: str
    ours: Side
    peer: Side
    tokens: int | None = None  # tokens generated per call: the row is reported in tokens/s
    flops: float | None = None  # training FLOPs per call, for MFU


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # tied weights once
    return sum(unique.values())


@dataclass
class Setup:
    """What the command line chose, for every row."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None  # autocast dtype of both sides; None: fp32
    size: str = "small"  # a key of SIZES
    compile: bool = False  # both sides of every training row through torch.compile


SETUP = Setup()


def autocast():
    return torch.autocast(SETUP.device.type, dtype=SETUP.dtype, enabled=SETUP.dtype is not None)


def synchronize() -> None:
    if SETUP.device.type == "cuda":
        torch.cuda.synchronize()


def on_device(*tensors: Tensor) -> list[Tensor]:
    """Inputs are drawn on the CPU, then moved: the same inputs whatever the device."""
    return [t.to(SETUP.device) for t in tensors]


def training_side(name: str, model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> Side:
    model.to(SETUP.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=SETUP.device.type == "cuda")
    forward = torch.compile(model) if SETUP.compile else model

    def step() -> None:
        with autocast():
            value = loss(forward)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Side(name, step, lambda: resident_bytes(model, optimizer))  # AdamW's state appears at step 1


def decoding_side(name: str, model: nn.Module, decode: Callable[[], Any]) -> Side:
    model.to(SETUP.device).eval()

    def call() -> Any:
        with torch.inference_mode(), autocast():
            return decode()

    return Side(name, call, lambda: resident_bytes(model))


def train_flops(batch: int, d_model: int, matmuls: list[tuple[int, int]], attention: list[tuple[int, int, int]]) -> float:
    """matmuls: (weights, tokens per sample); attention: (modules, queries, keys) per sample."""
    return batch * (6 * sum(w * n for w, n in matmuls) + 12 * d_model * sum(m * q * k for m, q, k in attention))


def peak_allocated(call: Callable[[], Any]) -> int:
    """Peak of tensor bytes allocated minus freed during ``call``: from the CUDA caching allocator's
    statistics on a GPU, from the profiler's memory events on the CPU."""
    if SETUP.device.type == "cuda":
        synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else the profiler logs every start and stop to stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    return max(itertools.accumulate((e.extra_fields.alloc_size for e in allocations), initial=0))  # frees are < 0


def timed(call: Callable[[], Any]) -> float:
    synchronize()  # GPU work is asynchronous: time it from idle to idle
    start = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - start


def measure(r: Row, warmup: int, iters: int, peak_flops: float) -> dict[str, Any]:
    sides = [r.ours, r.peer]
    for _ in range(warmup - 1):
        for side in sides:
            side.call()
    peak = [side.resident() + peak_allocated(side.call) for side in sides]  # the last warm-up call
    times: list[list[float]] = [[], []]
    for i in range(iters):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            times[k].append(timed(sides[k].call))
    out: dict[str, Any] = {"row": r.name, "unit": "tokens/s" if r.tokens else "ms/step", "tokens_per_call": r.tokens}
    for key, side, ts, mem in zip(("tfkit", "peer"), sides, times, peak):
        seconds = statistics.median(ts)
        out[key] = {
            "name": side.name,
            "seconds": seconds,
            "value": r.tokens / seconds if r.tokens else 1e3 * seconds,
            "mfu": r.flops / seconds / peak_flops if r.flops else None,
            "peak_mib": mem / 2**20,
        }
    out["ratio"] = out["peer"]["seconds"] / out["tfkit"]["seconds"]
    out["train_gflop_per_step"] = r.flops / 1e9 if r.flops else None
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def matmul_size() -> int:
    """n of the n×n @ n×n product that measures the device's matmul rate."""
    return 8192 if SETUP.device.type == "cuda" else 2048


def matmul_flops(warmup: int, iters: int) -> float:
    """FLOP/s of the matmul_size() product in the benchmark's dtype on its device."""
    n = matmul_size()
    a, b = (torch.randn(n, n, device=SETUP.device, dtype=SETUP.dtype or torch.float32) for _ in range(2))
    for _ in range(warmup):
        a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b) for _ in range(iters))


# dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first name found in the
# device's name wins. Others: --peak-tflops, or the measured matmul rate.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0}


def peak_flops(warmup: int, iters: int, override_tflops: float | None) -> tuple[float, float, str]:
    """(the FLOP/s MFU is reported against, the measured matmul FLOP/s, what the first one is)."""
    measured, n = matmul_flops(warmup, iters), matmul_size()
    dtype = "bf16" if SETUP.dtype is torch.bfloat16 else "fp32"
    if override_tflops:
        return override_tflops * 1e12, measured, f"{override_tflops:.0f} TFLOP/s (--peak-tflops)"
    if SETUP.device.type == "cuda" and SETUP.dtype is torch.bfloat16:
        name = torch.cuda.get_device_name(SETUP.device)
        card = next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)
        if card:
            return card * 1e12, measured, f"{card:.0f} TFLOP/s ({name} dense bf16 peak; its {n}² matmul: {measured / 1e12:.0f})"
    return measured, measured, f"{measured / 1e9:,.0f} GFLOP/s ({dtype} {n}² matmul)"
