"""Which time steps and which variables a forecast used, and the pictures of a forecast.

- Occlusion: each (variable, step) of the context set to that variable's mean over the context, and
  the mean absolute change of the forecast; summed over variables, it is the per-step importance.
- Attention rollout (Abnar & Zuidema, 2020) over the temporal layers of the first target, from
  patches back to the steps each patch covers.
- Permutation importance (Breiman, 2001): one variable's contexts shuffled across the origins of the
  history, and the rise of the forecast's mean absolute error (in training standard deviations).
- With ``model.cross_variable``, the attention each variable receives across variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from tfkit.inspect import (
    attention_rollout,
    capture_attention,
    draw_heads,
    figure_panels,
    save_figure,
)
from tfkit.recipes.forecast.data import Series

if TYPE_CHECKING:
    from tfkit.recipes.forecast.recipe import Forecast

MAX_ORIGINS = 1024  # permutation importance over at most this many origins, spread over the history
REPEATS = 3  # shuffles per variable


def point(recipe: Forecast, forecasts: np.ndarray) -> np.ndarray:
    """(B, H, T, Q) → the point forecasts (B, H, T): the median with quantiles."""
    return forecasts[..., recipe.quantiles.index(0.5)] if recipe.quantiles else forecasts[..., 0]


def occlusion(recipe: Forecast, model: nn.Module, context: Tensor) -> np.ndarray:
    """(V, L): the mean |change| of the point forecast when one value of the (L, V) context is replaced
    by its variable's mean over the context."""
    steps, variables = context.shape
    base = point(recipe, recipe.forecast(model, context[None]))
    occluded = context.repeat(variables * steps, 1, 1)  # one copy per (variable, step)
    v, s = np.divmod(np.arange(variables * steps), steps)
    occluded[np.arange(len(occluded)), s, v] = context.mean(0)[v]
    changed = point(recipe, recipe.forecast(model, occluded))
    std = np.array(recipe.facts["std"][: recipe.facts["targets"]])
    return (np.abs(changed - base) / std).mean((1, 2)).reshape(variables, steps)


def permutation(recipe: Forecast, model: nn.Module, scaled: Tensor, origins: np.ndarray, seed: int) -> np.ndarray:
    """(V,): how much the forecast's error rises when a variable's contexts are shuffled across ``origins``."""
    data, t = recipe.config["data"], recipe.facts["targets"]
    origins = origins[np.linspace(0, len(origins) - 1, min(len(origins), MAX_ORIGINS)).round().astype(int)]
    past = origins[:, None] + np.arange(-data["context"], 0)
    future = origins[:, None] + np.arange(data["horizon"])
    contexts, truths = scaled[past], recipe.unscale(scaled[future][..., :t].numpy())
    std = np.array(recipe.facts["std"][:t])

    def error(batch: Tensor) -> float:
        return float((np.abs(point(recipe, recipe.forecast(model, batch)) - truths) / std).mean())

    base, rng = error(contexts), np.random.default_rng(seed)
    rise = np.zeros(contexts.shape[-1])
    for v in range(len(rise)):
        for _ in range(REPEATS):
            shuffled = contexts.clone()
            shuffled[..., v] = contexts[rng.permutation(len(contexts)), :, v]
            rise[v] += (error(shuffled) - base) / REPEATS
    return rise


def patches_to_steps(per_patch: np.ndarray, steps: int, patch: int, stride: int) -> np.ndarray:
    """(N,) → (steps,): each step gets the mean of the patches that cover it."""
    total, count = np.zeros(steps + stride), np.zeros(steps + stride)
    for k, value in enumerate(per_patch):
        total[k * stride : k * stride + patch] += value
        count[k * stride : k * stride + patch] += 1
    return (total / np.maximum(count, 1))[:steps]


def measure(recipe: Forecast, model: nn.Module, series: Series, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What importance.npz holds: per (variable, step), per step and per variable, each way there is."""
    data, m = recipe.config["data"], recipe.config["model"]
    scaled = torch.tensor(recipe.scale(series.values), dtype=torch.float32)
    context = scaled[-data["context"] :]
    occluded = occlusion(recipe, model, context)
    temporal = [weights[n] for n in sorted(weights) if n.startswith("forecaster.temporal")]
    rollout = attention_rollout(temporal).mean(0)  # every patch feeds the head: average over the queries
    found = {
        "occlusion": occluded,  # (variables, steps)
        "steps_occlusion": occluded.sum(0),
        "steps_rollout": patches_to_steps(rollout, data["context"], m["patch"], m["stride"]),
        "variables_occlusion": occluded.sum(1),
    }
    origins = np.arange(data["context"], len(series) - data["horizon"] + 1)
    if len(origins) >= 8:  # fewer origins than that shuffle into noise
        found["variables_permutation"] = permutation(recipe, model, scaled, origins, recipe.config["seed"])
    if m["cross_variable"]:
        with torch.no_grad(), capture_attention(model) as captured:  # every patch's, not only the first's
            model(context[None].to(next(model.parameters()).device))
        across = captured["forecaster.across.layers.0.self_attn"]  # (patches, heads, V, V)
        found["variables_attention"] = across.mean((0, 1, 2)).numpy()
    return found


def ranking(found: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    """The per-variable importances by method, and the method that ranks them: permutation where measured."""
    ranked = {k.removeprefix("variables_"): v for k, v in found.items() if k.startswith("variables_")}
    return ("permutation" if "permutation" in ranked else "occlusion"), ranked


def explain(
    recipe: Forecast, series: Series, weights: dict[str, np.ndarray], found: dict[str, np.ndarray], out_dir: Path
) -> None:
    """Write importance.npz, the heads over the patches, series.png and variables.png; print the ranking."""
    data, m, names = recipe.config["data"], recipe.config["model"], recipe.facts["names"]
    for name, w in weights.items():
        labels = names if name.startswith("forecaster.across") else [str(k) for k in range(w.shape[-1])]
        draw_heads(w, labels, labels, f"{name} (patches of {m['patch']} steps every {m['stride']})", out_dir / f"{name}.png")
    np.savez_compressed(out_dir / "importance.npz", **found)
    context = recipe.scale(series.values[-data["context"] :])
    _draw_series(context, found, names, data["context"], out_dir / "series.png")
    key, ranked = ranking(found)
    _draw_variables(ranked, names, out_dir / "variables.png")
    table = Table(title=f"variables ranked by {key} importance (forecast of {', '.join(names[: recipe.facts['targets']])})")
    for column in ("rank", "variable", *ranked):
        table.add_column(column)
    for rank, v in enumerate(np.argsort(-ranked[key])):
        table.add_row(str(rank + 1), names[v], *(f"{values[v]:.4f}" for values in ranked.values()))
    Console().print(table)


def page(recipe: Forecast, series: Series, found: dict[str, np.ndarray]) -> dict:
    """report.html's views: the context and each step's importance drawn over the patches they fall
    in, and the variables' ranking as a table."""
    data, m, names = recipe.config["data"], recipe.config["model"], recipe.facts["names"]
    context = recipe.scale(series.values[-data["context"] :])
    span = data["context"] / m["stride"]  # the context's steps in patches (the last patch is padding)
    # a plot's lines are plain lists of numbers (arrays go to the page as 8-bit images)
    steps = {
        label: np.round(found[key] / max(float(found[key].max()), 1e-12), 5).tolist()
        for key, label in (("steps_occlusion", "occlusion"), ("steps_rollout", "rollout"))
    }
    key, ranked = ranking(found)
    order = np.argsort(-ranked[key])
    return {
        "panels": [
            {
                "kind": "plot",
                "title": "context (scaled)",
                "lines": {n: np.round(context[:, v], 5).tolist() for v, n in enumerate(names)},
                "align": "keys",
                "axis": "patches",
                "span": span,
            },
            {"kind": "plot", "title": "step importance", "lines": steps, "align": "keys", "axis": "patches", "span": span},
            {
                "kind": "table",
                "title": f"variables ranked by {key} importance",
                "columns": ["rank", "variable", *ranked],
                "rows": [
                    [rank + 1, names[v], *(round(float(values[v]), 5) for values in ranked.values())]
                    for rank, v in enumerate(order)
                ],
            },
        ]
    }


def _draw_series(context: np.ndarray, found: dict[str, np.ndarray], names: list[str], steps: int, path: Path) -> None:
    """The context window of every variable (scaled), and under it each step's importance."""
    fig, _ = figure_panels(1, 4.0, "the context window and which steps mattered")
    fig.clear()
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    back = np.arange(-steps, 0)
    for v, name in enumerate(names):
        top.plot(back, context[:, v], label=name, linewidth=1)
    top.legend(fontsize=7)
    top.set_ylabel("scaled value")
    for key, label in (("steps_occlusion", "occlusion"), ("steps_rollout", "attention rollout")):
        values = found[key]
        bottom.plot(back, values / max(values.max(), 1e-12), label=label)
    bottom.legend(fontsize=7)
    bottom.set_xlabel("steps before the forecast")
    bottom.set_ylabel("importance (max 1)")
    fig.set_size_inches(min(16.0, max(6.0, steps / 12)), 5)
    save_figure(fig, path)


def _draw_variables(ranking: dict[str, np.ndarray], names: list[str], path: Path) -> None:
    fig, axes = figure_panels(len(ranking), 3.0, "which variables mattered")
    for ax, (key, values) in zip(axes, ranking.items()):
        ax.barh(names, values)
        ax.invert_yaxis()
        ax.set_title(key, fontsize=9)
    save_figure(fig, path)


def draw_forecast(series: Series, forecast: np.ndarray, point: np.ndarray, targets: list[str], path: Path) -> None:
    """The last stretch of each target's history, its forecast, and the interval of the outer quantiles."""
    fig, axes = figure_panels(len(targets), 4.0, "forecast")
    horizon = len(forecast)
    shown = min(len(series), 4 * horizon)
    past, ahead = np.arange(-shown, 0), np.arange(horizon)
    for t, (ax, name) in enumerate(zip(axes, targets)):
        ax.plot(past, series.values[-shown:, t], color="black", linewidth=1, label="history")
        ax.plot(ahead, point[:, t], color="tab:blue", label="forecast")
        if forecast.shape[-1] > 1:
            ax.fill_between(ahead, forecast[:, t, 0], forecast[:, t, -1], color="tab:blue", alpha=0.25, label="interval")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("steps from the last row")
        ax.legend(fontsize=7)
    save_figure(fig, path)
