"""Multivariate time-series forecasting with a patch Transformer, and which steps and variables it used.

Reading order: ``data`` (reading, checking and making a series regular; the built-in series),
``model`` (PatchTST and the DLinear and LSTM baselines, each inside a per-window normalisation),
``metrics`` (MAE, RMSE, MASE, sMAPE, Pearson, coverage; the losses), ``baselines`` (seasonal naive,
statsforecast's AutoARIMA, AutoETS and AutoTheta, and the loop that trains DLinear and the LSTM), ``importance`` (occlusion, rollout,
permutation; the pictures), ``interop`` (the ONNX graph, in the series' units), ``recipe`` (the
splits by time, windows, backtest, predict, inspect).
"""

from tfkit.recipes.forecast.recipe import Forecast

__all__ = ["Forecast"]
