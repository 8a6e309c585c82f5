"""The peers a forecast is judged against, each fitted on the training part alone and asked for the
same origins.

Classical: the seasonal naive forecast, and statsforecast's AutoARIMA, AutoETS and AutoTheta with the
series' season. Each is fitted once on the training part; at every origin its ``forward`` applies
those fitted parameters to the history before the origin (no re-estimation), so no origin sees its
future and none sees another's. ETS and ARIMA are not made for long seasons: above ``LONG_SEASON``
steps (R's ``ets`` refuses them, and a 52-week seasonal ARIMA takes minutes per fit) the practitioner's
choice is MSTL (Bandara et al., 2021): an STL decomposition with that season, and AutoARIMA or AutoETS
on the deseasonalised rest; the row's name says which was used.

Neural: DLinear and an LSTM, trained on the same windows with the same loss, optimiser, number of
steps and learning-rate schedule as the Transformer (``baselines.steps: auto``), over several seeds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

LONG_SEASON = 24  # the longest season ETS and seasonal ARIMA are fitted with directly (R's ets refuses more)
CLASSICAL = ("autoarima", "autoets", "autotheta")  # the names baselines.classical takes


def seasonal_naive(values: np.ndarray, origins: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """(origins, H, T, 1): each step repeats the value one season before it, from the history before
    the origin (the last season again for horizons beyond one season)."""
    steps = np.arange(horizon)
    back = season * (steps // season + 1)  # how far back step h looks: inside the history
    return values[origins[:, None] + steps[None] - back[None]][..., None]


def classical_model(name: str, season: int) -> tuple[str, Any]:
    """The row name and the unfitted statsforecast model for ``name`` at ``season``."""
    from statsforecast.models import MSTL, AutoARIMA, AutoETS, AutoTheta

    long = season > LONG_SEASON
    if name == "autoarima":
        if long:
            return f"MSTL({season}) + AutoARIMA", MSTL(season_length=season, trend_forecaster=AutoARIMA())
        return f"AutoARIMA (season {season})", AutoARIMA(season_length=season)
    if name == "autoets":
        if long:  # ETS on the deseasonalised rest: error, trend and damping chosen by AICc, no season
            return f"MSTL({season}) + AutoETS", MSTL(season_length=season, trend_forecaster=AutoETS(model="ZZN"))
        return f"AutoETS (season {season})", AutoETS(season_length=season)
    if name == "autotheta":
        return f"AutoTheta (season {season})", AutoTheta(season_length=season)
    from tfkit.errors import UsageError

    raise UsageError(f"unknown baselines.classical entry '{name}' (valid: {', '.join(CLASSICAL)})")


def fit_classical(values: np.ndarray, train_end: int, season: int, names: list[str]) -> dict[str, list[Any]]:
    """{row name: one fitted model per target column of ``values``}, each fitted on ``values[:train_end]``."""
    fitted: dict[str, list[Any]] = {}
    with warnings.catch_warnings():  # statsforecast warns of poorly conditioned candidates it then skips
        warnings.simplefilter("ignore")
        for name in names:
            row = classical_model(name, season)[0]
            fitted[row] = [classical_model(name, season)[1].fit(values[:train_end, t].copy()) for t in range(values.shape[1])]
    return fitted


def classical_forecasts(models: list[Any], values: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """(origins, H, T, 1): each origin forecast by the fitted models from ``values`` before it only."""
    out = np.zeros((len(origins), horizon, values.shape[1], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t, model in enumerate(models):
            for i, origin in enumerate(origins):
                out[i, :, t, 0] = model.forward(y=values[:origin, t].copy(), h=horizon)["mean"]
    return out


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterator[dict[str, Tensor]]],
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    train: dict[str, Any],
    validate: Callable[[nn.Module], float],
) -> nn.Module:
    """Train ``model`` as the trainer trains the Transformer: ``train`` is the train section with the
    baselines' step count (its optimiser, peak rate, weight decay, clipping, warmup and schedule); keep
    the weights with the lowest ``validate``, checked every ``train.eval_every`` steps and at the end."""
    from tfkit.optim import build_optimizer, lr_factor

    steps = train["steps"]
    optimizer = build_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train))
    every = train["eval_every"] or steps
    best, best_state, step, epoch = math.inf, None, 0, 0
    while step < steps:
        for batch in batches(epoch):
            model.train()
            value = loss(model, batch)
            optimizer.zero_grad()
            value.backward()
            if train["clip_grad_norm"]:
                nn.utils.clip_grad_norm_(model.parameters(), train["clip_grad_norm"])
            optimizer.step()
            scheduler.step()
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
