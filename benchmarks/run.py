"""tfkit against peer implementations of the same models: same sizes, inputs, threads and optimiser.

    python benchmarks/run.py [--quick] [--json out.json] [--threads N] [--only TEXT] [--compile]
                             [--device cuda] [--precision bf16] [--size base] [--peak-tflops T]

Each row builds a tfkit model and its peer in this process from the same seed, warms both up, then
alternates them call by call (swapping who goes first) so that drift and the other processes on the
machine slow both alike, and reports medians. ratio = tfkit speed / peer speed: peer time over tfkit
time for training, tfkit tokens/s over peer tokens/s for decoding; > 1 means tfkit is faster.

Peak memory is the largest total of live tensor bytes during one call: the bytes resident between
calls (parameters, buffers, optimiser state) plus the peak of allocations minus frees during the
last warm-up call, which torch.profiler(profile_memory=True) records on the CPU and the caching
allocator's statistics give on a GPU. It counts tensors only, not the Python heap or allocator
slack, so it does not depend on what glibc or the CUDA allocator keeps cached.

--precision bf16 runs both sides' forward passes and losses under torch.autocast; --size base uses
the papers' base models (SIZES). Model FLOP utilisation (training rows) = training FLOPs per step /
step time / peak FLOP/s, where the peak is --peak-tflops if given, else on a GPU in bf16 the card's
dense bf16 peak from its data sheet (BF16_PEAK_TFLOPS) where the card is known, else the measured
median of an n×n @ n×n product in the benchmark's dtype (2·n³ FLOPs; n = 2048 on the CPU, 8192 on a
GPU), and

    training FLOPs = 6 · Σ (weights of a matmul × tokens it multiplies)
                   + 12 · d_model · Σ over attention modules (queries × keys)     (per sample, × batch)

6 = 2 FLOPs per multiply-add × 3 (the forward pass and the two matmuls of its backward). Counted
weights: attention projections, feed-forward layers, the output layer / classifier, the ViT patch
projection, the Conformer's convolutions (each kernel weight × the output positions it makes); not embeddings looked up by index, biases, LayerNorms, softmax or the optimiser.
Cross-attention's key and value projections multiply source tokens. The attention term counts QKᵀ and
the weighted sum of V over the full queries × keys grid, causal or not. Both sides of a row share the
same formula, so their MFU differ exactly as their speeds do; tfkit's relative-position projection,
which the peer lacks, is not counted. BERT's MLM transform and output layer
count only the positions chosen for prediction (15%), the useful work, for both sides: tfkit computes
them there only, transformers' BertForPreTraining at every position and ignores the rest (-100 labels),
so the peer's extra work shows as lower MFU rather than more FLOPs. Likewise tfkit's ViT runs its
last block for [CLS] alone (the only position its head reads) and timm's for every patch; both are
credited with the full last block.

rows.py builds the rows (both sides of each, at SIZES); harness.py measures them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from harness import SETUP, cpu_name, measure, peak_flops
from rich.console import Console
from rich.table import Table
from rows import ROWS, SIZES

CAPTION = (
    "median after warm-up; ratio = tfkit speed / peer speed (> 1: tfkit faster); "
    "MFU = (6·Σ matmul weights × tokens + 12·d·Σ queries × keys per attention module) × batch / step time / "
    "{peak}; peak = resident params, buffers, optimiser state + peak tensor bytes allocated in one call "
    "({memory}); threads: {threads}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 warm-up and 5 timed calls instead of 5 and 20")
    parser.add_argument("--json", help="also write the table to this JSON file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--only", help="run only the rows whose name contains this text")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides of the training rows")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast both sides")
    parser.add_argument(
        "--size", choices=list(SIZES), default="small", help="small: the CPU targets' sizes; base: the papers' base models"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak for MFU (default: a known card's bf16 peak, else the measured matmul)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.index is not None:
        torch.cuda.set_device(device)  # the allocator statistics and synchronize read the current device
    SETUP.device, SETUP.size, SETUP.compile = device, args.size, args.compile
    SETUP.dtype = torch.bfloat16 if args.precision == "bf16" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, iters = (2, 5) if args.quick else (5, 20)

    mfu_flops, matmul, peak_text = peak_flops(warmup, iters, args.peak_tflops)
    results = []
    for name, build in ROWS.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        torch.manual_seed(0)
        results.append(measure(build(), warmup, iters, mfu_flops))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next row's models start from a clean allocator

    threads = torch.get_num_threads()
    memory = "CUDA allocator statistics" if device.type == "cuda" else "torch.profiler"
    caption = CAPTION.format(peak=peak_text, memory=memory, threads=threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = f"tfkit vs peers ({where}, {args.precision}, {args.size} sizes{', training rows compiled' if args.compile else ''})"
    table = Table(title=title, caption=caption, caption_justify="left")
    for column in ("benchmark", "vs", "tfkit", "peer", "ratio", "MFU tfkit / peer", "peak MiB tfkit / peer"):
        names = column in ("benchmark", "vs")  # names wrap; numbers never do
        table.add_column(column, justify="left" if names else "right", no_wrap=not names)
    for r in results:
        ours, peer = r["tfkit"], r["peer"]
        value = "{:,.0f} tok/s" if r["tokens_per_call"] else "{:,.0f} ms"
        mfu = " / ".join(f"{side['mfu']:.0%}" for side in (ours, peer)) if ours["mfu"] is not None else "—"
        ratio = f"[{'green' if r['ratio'] >= 1 else 'red'}]{r['ratio']:.2f}×[/]"
        table.add_row(
            r["row"],
            peer["name"],
            value.format(ours["value"]),
            value.format(peer["value"]),
            ratio,
            mfu,
            f"{ours['peak_mib']:,.0f} / {peer['peak_mib']:,.0f}",
        )
    Console(width=None if sys.stdout.isatty() else 132).print(table)  # files and pipes get 80 columns

    if args.json:
        machine = {
            "torch": torch.__version__,
            "threads": threads,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "device": where,
            "precision": args.precision,
            "size": args.size,
            "mfu_peak_tflops": mfu_flops / 1e12,
            "matmul_gflops": matmul / 1e9,
            "warmup": warmup,
            "iters": iters,
            "compile": args.compile,
        }
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
