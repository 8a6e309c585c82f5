"""onnxruntime against tfkit's eager forward pass, on the graphs ``tfkit export --to onnx`` writes.

    python benchmarks/exported.py [--quick] [--threads N]   (not onnx.py: that name would shadow the onnx package)

Each model (rows.py's small sizes, random weights) is exported through ``tfkit.onnx.export_graph``,
the path of ``tfkit export`` (checked against PyTorch to 1e-4), then the same inputs run through
PyTorch under ``inference_mode`` and through an onnxruntime CPU session with the same thread count,
alternating, as run.py times its rows. A figure to know, not a target: ratio = tfkit speed /
onnxruntime speed (> 1: tfkit faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from harness import timed
from rich.console import Console
from rich.table import Table
from rows import SIZES
from torch import Tensor

from tfkit.onnx import Graph, export_graph


def bert_classifier() -> tuple[str, Graph, int, int]:
    from tfkit.recipes.bert.model import Bert, BertWithHead

    c = SIZES["small"]["bert"]
    bert = Bert(c["vocab"], c["d_model"], c["heads"], c["d_ff"], c["layers"], 0.0, "gelu", "post_ln", c["length"], 1e-12)

    def example(batch: int, length: int) -> dict[str, Tensor]:
        return {
            "token_ids": torch.randint(5, c["vocab"], (batch, length)),
            "segment_ids": torch.zeros(batch, length, dtype=torch.long),
        }

    axes = {"token_ids": {0: "batch", 1: "length"}, "segment_ids": {0: "batch", 1: "length"}}
    graph = Graph("bert", BertWithHead(bert, 2, 0.0, 1e-12), example, ["logits"], axes, limits={"length": {"max": c["length"]}})
    return "BERT classifier (4 layers, 128 tokens)", graph, c["batch"], c["length"]


def vit() -> tuple[str, Graph, int, int]:
    from tfkit.recipes.vit import VisionTransformer

    c = SIZES["small"]["vit"]
    model = VisionTransformer(
        c["image"], 3, c["classes"], c["patch"], c["d_model"], c["depth"], c["heads"], c["d_ff"], 0.0, 0.0, "gelu", "pre_ln", 1e-6
    )
    graph = Graph(
        "vit",
        model,
        lambda batch, _: {"images": torch.randn(batch, 3, c["image"], c["image"])},
        ["logits"],
        {"images": {0: "batch"}},
    )
    return "ViT (6 layers, 32×32 images)", graph, c["batch"], c["image"]


def gpt() -> tuple[str, Graph, int, int]:
    from tfkit.recipes.causal_lm import CausalLM
    from tfkit.recipes.causal_lm.interop import NextTokenLogits

    c = SIZES["small"]["gpt"]
    model = CausalLM(
        c["vocab"], c["d_model"], c["heads"], c["d_ff"], c["layers"], 0.0, "gelu_tanh", "gpt", "learned", c["length"]
    )
    graph = Graph(
        "gpt",
        NextTokenLogits(model),
        lambda batch, length: {"token_ids": torch.randint(0, c["vocab"], (batch, length))},
        ["logits"],
        {"token_ids": {0: "batch", 1: "length"}},
        limits={"length": {"max": c["length"]}},
    )
    return "GPT logits (4 layers, 128 tokens)", graph, c["batch"], c["length"]


def measure(graph: Graph, batch: int, length: int, threads: int, warmup: int, iters: int, folder: Path) -> dict[str, Any]:
    import onnxruntime

    path = folder / f"{graph.name}.onnx"
    worst = export_graph(graph, path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = graph.example(batch, length)
    arrays = {name: value.numpy() for name, value in feed.items()}
    module = graph.module.eval()

    def ours() -> None:
        with torch.inference_mode():
            module(*feed.values())

    def theirs() -> None:
        session.run(graph.outputs, arrays)

    sides: list[Callable[[], None]] = [ours, theirs]
    for _ in range(warmup):
        for side in sides:
            side()
    times: list[list[float]] = [[], []]
    for i in range(iters):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            times[k].append(timed(sides[k]))
    tfkit_ms, ort_ms = (1e3 * statistics.median(t) for t in times)
    return {"tfkit_ms": tfkit_ms, "onnxruntime_ms": ort_ms, "ratio": ort_ms / tfkit_ms, "max_abs_diff": worst, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 warm-up and 5 timed calls per side (default: 5 and 20)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both sides")
    args = parser.parse_args()
    warmup, iters = (2, 5) if args.quick else (5, 20)
    torch.set_num_threads(args.threads)
    table = Table(title=f"forward pass, CPU fp32, {args.threads} threads; ratio = tfkit speed / onnxruntime speed")
    for column in ("model", "batch", "tfkit ms", "onnxruntime ms", "ratio", "max |diff|"):
        table.add_column(column, justify="left" if column == "model" else "right")
    with tempfile.TemporaryDirectory() as folder:
        for build in (bert_classifier, vit, gpt):
            torch.manual_seed(0)
            name, graph, batch, length = build()
            r = measure(graph, batch, length, args.threads, warmup, iters, Path(folder))
            table.add_row(
                name,
                str(r["batch"]),
                f"{r['tfkit_ms']:.1f}",
                f"{r['onnxruntime_ms']:.1f}",
                f"{r['ratio']:.2f}×",
                f"{r['max_abs_diff']:.1e}",
            )
    Console(width=None if sys.stdout.isatty() else 132).print(table)


if __name__ == "__main__":
    main()
