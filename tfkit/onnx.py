"""A run's inference graphs as ONNX (``tfkit export RUN OUT --to onnx``), checked with onnxruntime.

Each recipe names its graphs (:meth:`~tfkit.recipe.Recipe.onnx_graphs`): the module, its inputs made
at any batch size and length, and which axes are dynamic. Each is exported by ``torch.onnx.export``
(the dynamo exporter) with dynamic batch and length axes, then run by onnxruntime on the CPU at two
batch sizes and two lengths other than the exported ones, and its outputs held to PyTorch's to 1e-4.
What cannot be in a graph (the tokenizer, image size and normalisation, feature settings, labels)
goes into ``onnx.json`` beside the graphs, with the files it names.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tfkit.errors import TfkitError, UsageError, first_line

TOLERANCE = 1e-4
CHECKS = ((1, 0), (3, 1))  # (batch, length index) pairs that onnxruntime runs besides the exported (2, -1)


@dataclass
class Graph:
    """One graph: ``module(*inputs)`` returns its outputs, in ``outputs``' order. ``example(batch,
    length)`` makes its inputs by name; ``lengths`` are three lengths to export at (the last) and check
    at; ``axes`` names each input's dynamic axes ({input: {axis: name}}), and ``limits`` bounds some
    ({name: {"max": most}} for a model's positions, {"min": least} where a model needs a few frames)."""

    name: str
    module: nn.Module
    example: Callable[[int, int], dict[str, Tensor]]
    outputs: list[str]
    axes: dict[str, dict[int, str]]
    lengths: tuple[int, int, int] = (5, 11, 8)
    limits: dict[str, dict[str, int]] | None = None


class GivenCache:
    """A :class:`~tfkit.nn.attention.KVCache` for a graph: the past keys and values (B, H, T, d_k) come
    in as inputs, and the grown ones, new positions appended, go out as outputs."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        return self.k.size(2)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        return self.k, self.v

    def keys_values(self) -> tuple[Tensor, Tensor]:
        return self.k, self.v


def _dims(graph: Graph, inputs: list[str]) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic shapes, one per input in order (the module's own argument names may differ)."""
    limits = graph.limits or {}
    made = {name: torch.export.Dim(name, **limits.get(name, {})) for axes in graph.axes.values() for name in axes.values()}
    return tuple({axis: made[name] for axis, name in graph.axes.get(inp, {}).items()} for inp in inputs)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("--to onnx needs onnx, onnxscript and onnxruntime (pip install 'tfkit[export]')") from None
    return onnxruntime


def export_graph(graph: Graph, path: Path) -> float:
    """Write ``graph`` to ``path`` and return the largest difference between onnxruntime's outputs and
    PyTorch's over the checks; one beyond TOLERANCE is an error."""
    onnxruntime = _onnxruntime()
    module = graph.module.eval()
    inputs = graph.example(2, graph.lengths[-1])
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on how it names the axes
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                input_names=list(inputs),
                output_names=graph.outputs,
                dynamic_shapes=_dims(graph, list(inputs)),
                dynamo=True,
                verbose=False,
                optimize=True,
            )
    except Exception as e:  # the exporter raises many types for code it cannot trace
        cause = e.__cause__ or e  # the exporter wraps torch.export's error in its own
        raise TfkitError(
            f"torch.onnx could not export the {graph.name} graph ({type(cause).__name__}: {first_line(cause)})"
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in CHECKS:
        feed = graph.example(batch, graph.lengths[length])
        with torch.no_grad():
            expected = module(*feed.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(graph.outputs, {name: value.numpy() for name, value in feed.items()})
        for name, ours, theirs in zip(graph.outputs, expected, got):
            if tuple(ours.shape) != theirs.shape:
                raise TfkitError(f"{path}: onnxruntime's {name} has shape {theirs.shape}, PyTorch's {tuple(ours.shape)}")
            diff = float((ours.float() - torch.from_numpy(theirs).float()).abs().max()) if ours.numel() else 0.0
            worst = max(worst, diff)
    if worst > TOLERANCE:
        raise TfkitError(f"{path}: onnxruntime's outputs differ from PyTorch's by {worst:.2g} (more than {TOLERANCE})")
    return worst


def export_onnx(recipe: Any, model: nn.Module, out: Path) -> float:
    """Every graph of ``recipe`` into ``out``, checked, and onnx.json: the graphs' inputs and outputs,
    and the recipe's pre- and post-processing (with the files it writes beside them). Returns the
    largest difference onnxruntime made."""
    graphs, checked = recipe.onnx_graphs(model), {}
    for graph in graphs:
        worst = export_graph(graph, out / f"{graph.name}.onnx")
        example = graph.example(1, graph.lengths[0])
        checked[graph.name] = {
            "file": f"{graph.name}.onnx",
            "inputs": {
                name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": _shape(t, graph.axes.get(name, {}))}
                for name, t in example.items()
            },
            "outputs": graph.outputs,
            "max_abs_diff_onnxruntime": worst,
        }
    meta = {"recipe": recipe.config["recipe"], "graphs": checked, **recipe.onnx_processing(out)}
    (out / "onnx.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return max(g["max_abs_diff_onnxruntime"] for g in checked.values())


def _shape(tensor: Tensor, axes: dict[int, str]) -> list[int | str]:
    return [axes.get(i, size) for i, size in enumerate(tensor.shape)]
