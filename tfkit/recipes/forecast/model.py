"""The forecasters: the patch Transformer (PatchTST), and the DLinear and LSTM baselines beside it.

Every model maps a context window (B, context, variables) of scaled values to forecasts
(B, horizon, targets, quantiles); the targets are the first variables. Each window is normalised
by its own mean and spread before the model sees it and the forecast is put back in its level
(RevIN, Kim et al. 2022, without the affine part), so a series that drifts out of the training
range (CO2 rises every year) is still in range for the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tfkit.nn.blocks import Encoder
from tfkit.nn.position import build_position

EPS = 1e-5


class InstanceNorm(nn.Module):
    """Wraps a forecaster: per window and variable, subtract the context's mean and divide by its
    standard deviation; the targets' forecasts get both back."""

    def __init__(self, forecaster: nn.Module, targets: int):
        super().__init__()
        self.forecaster = forecaster
        self.targets = targets

    def forward(self, context: Tensor, **options) -> Tensor:
        mean = context.mean(1, keepdim=True)  # (B, 1, V)
        std = context.std(1, keepdim=True, unbiased=False) + EPS
        out = self.forecaster((context - mean) / std, **options)  # (B, H, T, Q)
        return out * std[:, :, : self.targets, None] + mean[:, :, : self.targets, None]


class PatchTransformer(nn.Module):
    """PatchTST (Nie et al., 2023): each variable's context cut into patches of ``patch`` steps every
    ``stride`` steps (the last value repeated ``stride`` times at the end, as the paper pads), each
    patch a token, an encoder over a variable's tokens, and one linear head from all of a target's
    tokens to its ``horizon`` steps. Channel-independent: variables share the weights and never see
    each other, unless ``cross_variable`` adds an encoder layer across the variables at each patch
    (with a learned embedding per variable, so a target can tell which variable informs it).

    The position orders the patches: on their embeddings, or (rotary) on the temporal encoder's
    queries and keys. Variables have no order: the across-variable layer gets no position, and its
    attention is the block's own (a relative attention would invent an order)."""

    def __init__(
        self,
        variables: int,
        targets: int,
        context: int,
        horizon: int,
        quantiles: int,
        patch: int,
        stride: int,
        d_model: int,
        heads: int,
        layers: int,
        d_ff: int,
        dropout: float,
        activation: str,
        block: str,
        position: str,
        cross_variable: bool,
        attention: str | None = None,
        feed_forward: str | None = None,
        norm: str | None = None,
    ):
        super().__init__()
        self.targets, self.horizon, self.quantiles = targets, horizon, quantiles
        self.patch, self.stride = patch, stride
        self.count = (context + stride - patch) // stride + 1
        self.embed = nn.Linear(patch, d_model)
        self.position, rotary = build_position(position, d_model, heads, self.count)
        self.dropout = nn.Dropout(dropout)
        self.temporal = Encoder(
            block,
            layers,
            d_model,
            heads,
            d_ff,
            dropout,
            activation,
            rotary,
            attention=attention,
            feed_forward=feed_forward,
            norm=norm,
        )
        self.cross_variable = cross_variable
        if cross_variable:
            self.variable = nn.Parameter(torch.randn(variables, d_model) * 0.02)
            self.across = Encoder(block, 1, d_model, heads, d_ff, dropout, activation, feed_forward=feed_forward, norm=norm)
        self.head = nn.Linear(self.count * d_model, horizon * quantiles)

    def patches(self, context: Tensor) -> Tensor:
        """(B, L, V) → (B, V, N, patch)."""
        series = context.transpose(1, 2)
        series = torch.cat([series, series[..., -1:].expand(-1, -1, self.stride)], -1)
        return series.unfold(-1, self.patch, self.stride)

    def forward(self, context: Tensor) -> Tensor:
        if not self.cross_variable:  # the other variables could not reach the targets' forecasts
            context = context[..., : self.targets]
        patches = self.patches(context)
        b, v, n, _ = patches.shape
        tokens = self.dropout(self.position(self.embed(patches).flatten(0, 1)))  # (B·V, N, D)
        tokens = self.temporal(tokens).view(b, v, n, -1)
        if self.cross_variable:
            mixed = (tokens + self.variable[:, None]).transpose(1, 2).flatten(0, 1)  # (B·N, V, D)
            tokens = self.across(mixed).view(b, n, v, -1).transpose(1, 2)
        out = self.head(tokens[:, : self.targets].flatten(2))  # (B, T, H·Q)
        return out.view(b, self.targets, self.horizon, self.quantiles).transpose(1, 2)


class DLinear(nn.Module):
    """DLinear (Zeng et al., 2023): the context split into a moving-average trend and the rest, one
    linear map from each to the horizon, shared by the targets, which it forecasts one by one."""

    def __init__(self, targets: int, context: int, horizon: int, quantiles: int, kernel: int = 25):
        super().__init__()
        self.targets, self.horizon, self.quantiles = targets, horizon, quantiles
        self.kernel = min(kernel, context) | 1  # odd, so the average is centred
        self.trend = nn.Linear(context, horizon * quantiles)
        self.rest = nn.Linear(context, horizon * quantiles)

    def forward(self, context: Tensor) -> Tensor:
        series = context[..., : self.targets].transpose(1, 2)  # (B, T, L)
        half = self.kernel // 2
        padded = torch.cat([series[..., :1].expand(-1, -1, half), series, series[..., -1:].expand(-1, -1, half)], -1)
        trend = padded.unfold(-1, self.kernel, 1).mean(-1)
        out = self.trend(trend) + self.rest(series - trend)  # (B, T, H·Q)
        return out.view(len(context), self.targets, self.horizon, self.quantiles).transpose(1, 2)


class LSTMForecaster(nn.Module):
    """An LSTM over the context of every variable; its last state maps to all targets' horizons."""

    def __init__(self, variables: int, targets: int, horizon: int, quantiles: int, hidden: int, layers: int):
        super().__init__()
        self.targets, self.horizon, self.quantiles = targets, horizon, quantiles
        self.lstm = nn.LSTM(variables, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, horizon * targets * quantiles)

    def forward(self, context: Tensor) -> Tensor:
        states, _ = self.lstm(context)
        return self.head(states[:, -1]).view(len(context), self.horizon, self.targets, self.quantiles)
