"""A forecaster outside tfkit: the ONNX graph, which takes and gives values in the series' own units.

The training part's scaling (each variable's mean and standard deviation) is inside the graph, and
the quantiles come out sorted, as predict writes them, so the graph needs nothing beside it but the
variables' order (onnx.json).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tfkit.onnx import Graph


class InUnits(nn.Module):
    """A forecaster with the training part's scaling around it, and its quantiles sorted."""

    def __init__(self, model: nn.Module, facts: dict[str, Any]):
        super().__init__()
        self.model, self.t = model, facts["targets"]
        self.register_buffer("mean", torch.tensor(facts["mean"], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(facts["std"], dtype=torch.float32))

    def forward(self, values: Tensor) -> Tensor:
        scaled = self.model((values - self.mean) / self.std).sort(dim=-1).values
        return scaled * self.std[: self.t, None] + self.mean[: self.t, None]


def onnx_graph(model: nn.Module, facts: dict[str, Any], context: int) -> Graph:
    """The last ``context`` steps of every variable (B, context, variables), in their own units →
    forecasts (B, horizon, targets, quantiles) in the targets' units, quantiles sorted."""
    variables = len(facts["names"])

    def example(batch: int, length: int) -> dict[str, Tensor]:
        scaled = torch.randn(batch, context, variables, generator=torch.Generator().manual_seed(batch * 1000 + length))
        return {"values": scaled * torch.tensor(facts["std"]) + torch.tensor(facts["mean"])}

    return Graph("model", InUnits(model, facts), example, ["forecasts"], {"values": {0: "batch"}})
