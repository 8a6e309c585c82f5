"""Forecast errors over a backtest, in the targets' own units, and the training losses.

MASE divides the mean absolute error by the in-sample mean absolute error of the seasonal naive
forecast on the training part (Hyndman & Koehler, 2006), so below 1 beats that baseline's one-step
error. With several targets each metric is the mean over targets; MAE and RMSE are then in units of
each target's training standard deviation, since their own units need not agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def pinball(forecast: Tensor, truth: Tensor, quantiles: list[float]) -> Tensor:
    """The summed quantile loss of (B, H, T, Q) forecasts of (B, H, T) truths."""
    levels = torch.tensor(quantiles, device=forecast.device, dtype=forecast.dtype)
    error = truth[..., None] - forecast
    return torch.maximum(levels * error, (levels - 1) * error).sum()


def seasonal_scale(train: np.ndarray, season: int) -> np.ndarray:
    """Per target: the training part's mean |y_t − y_{t−season}|."""
    lag = season if len(train) > season else 1
    return np.abs(train[lag:] - train[:-lag]).mean(0)


def scores(
    forecasts: np.ndarray, truths: np.ndarray, scale: np.ndarray, spread: np.ndarray, quantiles: list[float] | None
) -> dict[str, float]:
    """Metrics of (origins, H, T, Q) forecasts against (origins, H, T) truths; the point forecast is
    the median. ``scale`` is the MASE scale and ``spread`` the training standard deviation per target."""
    point = forecasts[..., quantiles.index(0.5)] if quantiles else forecasts[..., 0]
    error = point - truths
    units = np.ones_like(spread) if len(spread) == 1 else spread
    metrics = {
        "mae": float((np.abs(error).mean((0, 1)) / units).mean()),
        "rmse": float((np.sqrt((error**2).mean((0, 1))) / units).mean()),
        "mase": float((np.abs(error).mean((0, 1)) / scale).mean()),
        "smape": float(100 * np.mean(2 * np.abs(error) / np.maximum(np.abs(point) + np.abs(truths), 1e-12))),
        "pearson": float(np.mean([_pearson(point[..., t].ravel(), truths[..., t].ravel()) for t in range(truths.shape[-1])])),
    }
    if quantiles:
        low, high = forecasts[..., 0], forecasts[..., -1]
        metrics[f"coverage_{round(100 * (quantiles[-1] - quantiles[0]))}"] = float(
            100 * np.mean((truths >= low) & (truths <= high))
        )
    return metrics


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
