"""The peers a forecast is judged against, each fitted on the training part alone and asked for the
same origins: the seasonal naive forecast, ARIMA (statsmodels, the order with the lowest AIC over a
stated grid), DLinear and an LSTM (trained on the same windows with the same loss and optimiser)."""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn


def seasonal_naive(values: np.ndarray, origins: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """(origins, H, T, 1): each step repeats the value one season before it, from the history before
    the origin (the last season again for horizons beyond one season)."""
    steps = np.arange(horizon)
    back = season * (steps // season + 1)  # how far back step h looks: inside the history
    return values[origins[:, None] + steps[None] - back[None]][..., None]


def arima(series: np.ndarray, train_end: int, origins: np.ndarray, horizon: int, orders: list[list[int]]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """(origins, H, T, 1) from one ARIMA per target column of ``series`` (scaled), fitted on
    ``series[:train_end]``; each origin is forecast by filtering that model over the history before
    it. Also the chosen order per target."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.arima.model import ARIMA

    out = np.zeros((len(origins), horizon, series.shape[1], 1))
    chosen = []
    with warnings.catch_warnings():  # a poor order in the grid may not converge; its AIC says so
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        for t in range(series.shape[1]):
            fits = []
            for order in orders:
                trend = "c" if order[1] == 0 else "t"  # a constant, or a drift once differenced
                try:
                    fits.append(ARIMA(series[:train_end, t], order=tuple(order), trend=trend).fit())
                except (np.linalg.LinAlgError, ValueError):
                    continue
            best = min(fits, key=lambda fit: fit.aic)
            chosen.append(tuple(best.model.order))
            for i, origin in enumerate(origins):
                out[i, :, t, 0] = best.apply(series[:origin, t]).forecast(horizon)
    return out, chosen


def fit(model: nn.Module, batches: Callable[[int], Iterator[dict[str, Tensor]]], loss: Callable[[nn.Module, dict[str, Tensor]], Tensor],
        steps: int, lr: float, validate: Callable[[nn.Module], float], checks: int = 5) -> nn.Module:
    """Train ``model`` for ``steps`` AdamW steps over the epochs of ``batches``; keep the weights with
    the lowest ``validate`` of ``checks`` checks along the way (as the Transformer's keep_best does)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    best, best_state, step, epoch = float("inf"), None, 0, 0
    every = max(1, steps // checks)
    while step < steps:
        for batch in batches(epoch):
            model.train()
            value = loss(model, batch)
            optimizer.zero_grad()
            value.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % every == 0 or step == steps:
                model.eval()
                score = validate(model)
                if score < best:
                    best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
            if step == steps:
                break
        epoch += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


def lstm_hidden(parameters: int, variables: int, outputs: int, layers: int) -> int:
    """The hidden size at which an LSTM of ``layers`` layers and its head have about ``parameters``
    parameters: 4h(v + h + 2) for the first layer, 4h(2h + 2) for each further one, h·outputs + outputs."""
    a = 4 + 8 * (layers - 1)
    b = 4 * (variables + 2) + 8 * (layers - 1) + outputs
    c = outputs - parameters
    return max(4, round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))
