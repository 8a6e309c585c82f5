"""The ``forecast`` recipe: windows of a series in time order, the backtest, predict and inspection.

The series splits by time: train, then the last ``validation_size`` steps before the test part, then
the last ``test_size`` steps. Scaling statistics come from the training part alone. A forecast made
at origin ``o`` sees steps ``o − context .. o − 1`` and forecasts ``o .. o + horizon − 1``; training
uses every origin whose horizon lies in the training part, the backtest every ``origin_stride``-th
origin of the validation or test part (its history may reach back into the parts before).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit import config as configs
from tfkit import run as runs
from tfkit.data import seeded_generator
from tfkit.errors import UsageError
from tfkit.onnx import Graph
from tfkit.recipe import AttentionExample, Batch, Loss, Recipe, batch_ranges
from tfkit.recipes.forecast import baselines as peers
from tfkit.recipes.forecast import importance, interop
from tfkit.recipes.forecast.data import Series, make_series, read_frame
from tfkit.recipes.forecast.metrics import pinball, scores, seasonal_scale
from tfkit.recipes.forecast.model import (
    DLinear,
    InstanceNorm,
    LSTMForecaster,
    PatchTransformer,
)
from tfkit.registry import register

# each built-in series' sizes; a user's series gets them from its length and season (_settle_sizes)
BUILTIN_SIZES = {
    "co2": {
        "data.context": 104,
        "data.horizon": 26,
        "data.validation_size": 156,
        "data.test_size": 312,
        "data.origin_stride": 4,
        "model.patch": 8,
        "model.stride": 8,
        "train.steps": 1500,
    },
    "macro": {
        "data.context": 16,
        "data.horizon": 4,
        "data.validation_size": 24,
        "data.test_size": 40,
        "data.origin_stride": 1,
        "model.patch": 4,
        "model.stride": 4,
        "train.steps": 1500,
    },
}
SERIES_FILE = "series.json"  # the variables, their roles and the training part's statistics
BASELINES_FILE = "baselines.json"  # the baselines' scores, kept so a second evaluate costs nothing


@register("recipe", "forecast")
class Forecast(Recipe):
    """Multivariate forecasting: patch Transformer (PatchTST), backtest against AutoARIMA, AutoETS, AutoTheta, DLinear, LSTM."""

    config_file = "forecast.yaml"
    minimised = ("mae", "mse", "rmse", "mase", "smape")
    ranges = configs.ranges((*configs.AT_LEAST_1, ("patch", "stride", "seeds")))
    unit = "win"
    facts: dict[str, Any]  # what series.json holds

    # -- data -------------------------------------------------------------------------------------
    def prepare(self, run_dir: Path | None = None) -> None:
        data = self.config["data"]
        frame, roles = read_frame(data["name"], data["hub_config"])
        if run_dir is not None:
            self.load(run_dir)
            self.series = make_series(frame, {}, self._data_of_run(), data["name"], self.facts["names"])
        else:
            self.series = make_series(frame, roles, data, data["name"])
        self._settle_sizes(len(self.series), self.series.season)
        self.bounds = self._bounds(len(self.series))
        if run_dir is None:
            train = self.series.values[: self.bounds[0]]
            std = train.std(0)
            self.facts = {
                "names": self.series.names,
                "targets": self.series.targets,
                "frequency": self.series.frequency,
                "season": self.series.season,
                "time_column": self.series.time_column,
                "mean": train.mean(0).tolist(),
                "std": np.where(std > 0, std, 1.0).tolist(),
                "mase_scale": np.maximum(seasonal_scale(train[:, : self.series.targets], self.series.season), 1e-12).tolist(),
            }
        self.scaled = torch.tensor(self.scale(self.series.values), dtype=torch.float32)
        n_train, n_validation = self.bounds
        context, horizon, stride = data["context"], data["horizon"], data["origin_stride"]
        self.origins = {
            "train": np.arange(context, n_train - horizon + 1),
            "validation": np.arange(max(n_train, context), n_validation - horizon + 1, stride),
            "test": np.arange(n_validation, len(self.series) - horizon + 1, stride),
        }
        self.settle_steps(len(self.origins["train"]))
        self.settle("baselines.steps", lambda: (self.config["train"]["steps"], "the Transformer's train.steps"))

    def builtin_sizes(self) -> dict[str, Any]:
        return BUILTIN_SIZES.get(self.config["data"]["name"], {})

    def _settle_sizes(self, steps: int, season: int) -> None:
        """The window and split sizes left at auto: a built-in series' own, else from the series'
        length and season: one season ahead (without one, a fiftieth of the series, at most 24),
        four horizons of context, about 12 patches to a context, and validation and test parts of
        6 and 12 horizons, at most a tenth and a fifth of the series."""
        data = self.config["data"]
        by_season = season > 1
        self.settle(
            "data.horizon",
            lambda: (
                min(season if by_season else min(max(1, steps // 50), 24), max(1, steps // 10)),
                f"one season of {season} steps"
                if by_season
                else f"a fiftieth of the series' {steps} steps, at most 24 (it has no season: data.frequency or data.season gives one)",
            ),
        )
        horizon = data["horizon"]
        self.settle("data.context", lambda: (max(8, 4 * horizon), "four horizons, at least 8 steps"))
        self.settle(
            "data.validation_size",
            lambda: (max(horizon, min(6 * horizon, steps // 10)), "six horizons, at most a tenth of the series"),
        )
        self.settle(
            "data.test_size",
            lambda: (max(horizon, min(12 * horizon, steps // 5)), "twelve horizons, at most a fifth of the series"),
        )
        self.settle("data.origin_stride", lambda: (max(1, horizon // 6), "a sixth of the horizon"))
        context = data["context"]
        self.settle("model.patch", lambda: (max(1, context // 12), f"about 12 patches over a context of {context}"))
        self.settle("model.stride", lambda: (self.config["model"]["patch"], "patches side by side, as model.patch"))

    def imitate_builtin_data(self) -> None:
        self.facts = {"names": ["co2"], "targets": 1}
        self.settle_builtin()

    def _bounds(self, steps: int) -> tuple[int, int]:
        """Where the training part ends and where the validation part ends."""
        data = self.config["data"]
        n_validation = steps - data["test_size"]
        n_train = n_validation - data["validation_size"]
        need = data["context"] + data["horizon"]
        if data["test_size"] < data["horizon"] or data["validation_size"] < data["horizon"]:
            raise UsageError(
                f"data.test_size ({data['test_size']}) and data.validation_size ({data['validation_size']}) "
                f"must each hold at least one horizon (data.horizon {data['horizon']})"
            )
        if n_train < need:
            raise UsageError(
                f"the series has {steps} steps: after the last {data['test_size']} for test and "
                f"{data['validation_size']} for validation, {max(n_train, 0)} are left to train on, fewer than one "
                f"window (data.context + data.horizon = {need}); shorten them"
            )
        return n_train, n_validation

    def _data_of_run(self) -> dict[str, Any]:
        """The data section with the column roles and frequency the run was trained with."""
        facts = self.facts
        return {
            **self.config["data"],
            "time_column": facts["time_column"],
            "targets": facts["names"][: facts["targets"]],
            "covariates": facts["names"][facts["targets"] :],
            "frequency": facts["frequency"],
            "season": facts["season"],
        }

    def scale(self, values: np.ndarray) -> np.ndarray:
        return (values - np.array(self.facts["mean"])) / np.array(self.facts["std"])

    def unscale(self, scaled: np.ndarray) -> np.ndarray:
        """(..., T) or (..., T, Q) scaled target values → the targets' own units."""
        t = self.facts["targets"]
        mean, std = np.array(self.facts["mean"][:t]), np.array(self.facts["std"][:t])
        if scaled.shape[-1] != t:
            return scaled * std[:, None] + mean[:, None]
        return scaled * std + mean

    def save(self, run_dir: Path) -> None:
        runs.write_json(run_dir, SERIES_FILE, self.facts)

    def load(self, run_dir: Path) -> None:
        self.facts = runs.read_json(run_dir, SERIES_FILE)
        self.run_dir = run_dir

    @property
    def quantiles(self) -> list[float] | None:
        levels = self.config["model"]["quantiles"]
        if levels is not None and (0.5 not in levels or sorted(levels) != levels or not all(0 < q < 1 for q in levels)):
            raise UsageError(f"model.quantiles must rise, lie between 0 and 1 and include 0.5, got {levels}")
        return levels

    def build_model(self) -> nn.Module:
        m, data = self.config["model"], self.config["data"]
        variables, targets = len(self.facts["names"]), self.facts["targets"]
        if m["patch"] > data["context"]:
            raise UsageError(f"model.patch ({m['patch']}) is longer than data.context ({data['context']})")
        forecaster = PatchTransformer(
            variables,
            targets,
            data["context"],
            data["horizon"],
            len(self.quantiles or [0.5]),
            m["patch"],
            m["stride"],
            m["d_model"],
            m["heads"],
            m["layers"],
            m["d_ff"],
            m["dropout"],
            m["activation"],
            m["block"],
            m["position"],
            m["cross_variable"],
            m["attention"],
            m["feed_forward"],
            m["norm"],
        )
        return InstanceNorm(forecaster, targets)

    # -- training ---------------------------------------------------------------------------------
    def windows(self, origins: np.ndarray) -> tuple[Tensor, Tensor]:
        """The contexts (B, L, V) and the target futures (B, H, T) at ``origins``, scaled."""
        data = self.config["data"]
        origins = torch.as_tensor(origins)
        past = origins[:, None] + torch.arange(-data["context"], 0)
        future = origins[:, None] + torch.arange(data["horizon"])
        return self.scaled[past], self.scaled[future][..., : self.facts["targets"]]

    def train_batches(self, epoch: int, seed: int | None = None) -> Iterator[Batch]:
        size = self.config["train"]["batch_size"]
        generator = seeded_generator(self.config["seed"] if seed is None else seed, epoch)
        origins = self.origins["train"][torch.randperm(len(self.origins["train"]), generator=generator).numpy()]
        for start in range(0, len(origins), size):
            context, future = self.windows(origins[start : start + size])
            yield {"context": context, "future": future}

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        return Loss([(self._loss_sum(model, batch), batch["future"].numel())], len(batch["context"]))

    def _loss_sum(self, model: nn.Module, batch: Batch) -> Tensor:
        """Summed squared error of the point forecast, or the summed pinball loss of the quantiles."""
        forecast = model(batch["context"]).float()
        if self.quantiles:
            return pinball(forecast, batch["future"], self.quantiles)
        return F.mse_loss(forecast[..., 0], batch["future"], reduction="sum")

    # -- the backtest -----------------------------------------------------------------------------
    @torch.no_grad()
    def forecast(self, model: nn.Module, contexts: Tensor) -> np.ndarray:
        """(B, L, V) scaled contexts → (B, H, T, Q) forecasts in the targets' units. The quantiles are
        sorted, so that they never cross: the rearrangement never raises the pinball loss (Chernozhukov,
        Fernández-Val and Galichon 2010)."""
        model.eval()
        device = next(model.parameters()).device
        size = self.config["predict"]["batch_size"]
        parts = [model(contexts[i : i + size].to(device)).float().cpu() for i in range(0, len(contexts), size)]
        return self.unscale(torch.cat(parts).sort(dim=-1).values.numpy())

    def eval_outputs(
        self, model: nn.Module, split: str, rank: int = 0, world: int = 1
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per origin of ``split``: its forecast (H, T, Q) and the truth (H, T)."""
        origins, out = self.origins[split], {}
        for places in batch_ranges(len(origins), self.config["predict"]["batch_size"], rank, world):
            context, future = self.windows(origins[places.start : places.stop])
            forecasts, truths = self.forecast(model, context), self.unscale(future.numpy())
            out.update(zip(places, zip(forecasts, truths)))
        return out

    def score(self, split: str, outputs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        forecasts, truths = np.stack([f for f, _ in outputs]), np.stack([t for _, t in outputs])
        return self._scores(forecasts, truths)

    def _scores(self, forecasts: np.ndarray, truths: np.ndarray) -> dict[str, float]:
        t = self.facts["targets"]
        return scores(forecasts, truths, np.array(self.facts["mase_scale"]), np.array(self.facts["std"][:t]), self.quantiles)

    reference: str | None = None  # the best classical row on validation, once baselines() has chosen it

    def baselines(self, split: str) -> dict[str, dict[str, float]]:
        """The peers' scores on the origins of ``split``; kept in the run directory, keyed by what
        they depend on, so only the first evaluate pays for fitting them. Sets :attr:`reference`, the
        classical row with the lowest validation MASE, which the table measures every row against."""
        key = hashlib.sha1(
            json.dumps(
                [
                    split,
                    self.config["seed"],
                    self.config["data"],
                    self.config["baselines"],
                    self.config["model"]["quantiles"],
                    self.config["train"],
                ],
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        kept = runs.read_json(self.run_dir, BASELINES_FILE) if (self.run_dir / BASELINES_FILE).is_file() else {}
        if key not in kept:
            kept[key] = self._fit_baselines(split)
            runs.write_json(self.run_dir, BASELINES_FILE, kept)
        self.reference = kept[key]["reference"]
        return kept[key]["scores"]

    def _fit_baselines(self, split: str) -> dict[str, Any]:
        """{"scores": {row: metrics}, "reference": row, "validation": {classical row: metrics}}."""
        data, cfg = self.config["data"], self.config["baselines"]
        t, horizon = self.facts["targets"], data["horizon"]
        quantiles = len(self.quantiles or [0.5])  # a point forecast carries no interval: each quantile is the point

        def truths(part: str) -> np.ndarray:
            return self.unscale(self.windows(self.origins[part])[1].numpy())

        values = self.series.values[:, :t]
        naive = peers.seasonal_naive(values, self.origins[split], horizon, self.series.season)
        out = {f"seasonal naive ({self.series.season})": self._scores(np.repeat(naive, quantiles, -1), truths(split))}
        fitted = peers.fit_classical(values, self.bounds[0], self.series.season, cfg["classical"])
        validation = {}
        for row, models in fitted.items():
            for part in dict.fromkeys(["validation", split]):
                forecasts = np.repeat(peers.classical_forecasts(models, values, self.origins[part], horizon), quantiles, -1)
                scored = self._scores(forecasts, truths(part))
                if part == "validation":
                    validation[row] = scored
                if part == split:
                    out[row] = scored
        reference = min(validation, key=lambda row: validation[row]["mase"]) if validation else None
        if reference is not None:  # the row's name says it was chosen, and on what
            out = {(f"{row} [best classical on validation]" if row == reference else row): v for row, v in out.items()}
            reference = f"{reference} [best classical on validation]"
        out.update(self._neural_baselines(split, truths(split)))
        return {"scores": out, "reference": reference, "validation": validation}

    def neural_budget(self) -> dict[str, Any]:
        """The train section DLinear and the LSTM are trained with: the Transformer's (optimiser, peak
        rate, warmup, schedule, clipping, validation checks), with ``baselines.steps`` steps."""
        return {**self.config["train"], "steps": self.config["baselines"]["steps"]}

    def _neural_baselines(self, split: str, truths: np.ndarray) -> dict[str, dict[str, float]]:
        """DLinear (the targets alone) and the LSTM (every variable), each trained with
        ``baselines.seeds`` seeds; the mean of each metric, and its sd as ``<metric>_sd``."""
        data, cfg = self.config["data"], self.config["baselines"]
        t, variables, horizon = self.facts["targets"], len(self.facts["names"]), data["horizon"]
        quantiles = len(self.quantiles or [0.5])
        size = sum(p.numel() for p in self.build_model().parameters())
        hidden = cfg["lstm_hidden"] or peers.lstm_hidden(size, variables, horizon * t * quantiles, cfg["lstm_layers"])
        budget = self.neural_budget()
        seeds = range(self.config["seed"], self.config["seed"] + cfg["seeds"])
        rows = {
            f"DLinear (targets only; {len(seeds)} seeds)": lambda: DLinear(t, data["context"], horizon, quantiles),
            f"LSTM (targets and covariates; {len(seeds)} seeds)": lambda: LSTMForecaster(
                variables, t, horizon, quantiles, hidden, cfg["lstm_layers"]
            ),
        }
        out = {}
        for row, make in rows.items():
            runs_ = []
            for seed in seeds:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = self._train_baseline(InstanceNorm(make(), t), budget, seed)
                runs_.append(self._scores(self.forecast(model, self.windows(self.origins[split])[0]), truths))
            out[row] = {m: float(np.mean([r[m] for r in runs_])) for m in runs_[0]}
            out[row].update(
                {f"{m}_sd": float(np.std([r[m] for r in runs_], ddof=1)) if len(runs_) > 1 else 0.0 for m in runs_[0]}
            )
        return out

    def _train_baseline(self, model: nn.Module, budget: dict[str, Any], seed: int) -> nn.Module:
        def validate(candidate: nn.Module) -> float:
            outputs = self.eval_outputs(candidate, "validation")
            return self.score("validation", [outputs[i] for i in sorted(outputs)])["mase"]

        def loss(candidate: nn.Module, batch: Batch) -> Tensor:
            return self._loss_sum(candidate, batch) / batch["future"].numel()

        return peers.fit(model, lambda epoch: self.train_batches(epoch, seed), loss, budget, validate)

    # -- using a trained run ----------------------------------------------------------------------
    def read_history(self, path: Path) -> Series:
        """A user's history file, checked against the run's variables; at least one context long."""
        frame, _ = read_frame(str(path))
        series = make_series(frame, {}, self._data_of_run(), str(path), self.facts["names"])
        if len(series) < self.config["data"]["context"]:
            raise UsageError(
                f"{path} has {len(series)} steps, fewer than the {self.config['data']['context']} the model reads (data.context)"
            )
        return series

    def predict_header(self) -> str:
        return ",".join(["file", "time", "variable", "forecast", *(f"q{q:g}" for q in self.quantiles or [])])

    def predict_file(self, model: nn.Module, path: Path, out: TextIO) -> None:
        """CSV rows of the ``horizon`` steps after the file's last row (file, time, variable, forecast,
        quantiles) and a PNG of history, forecast and interval in RUN/forecasts/."""
        series = self.read_history(path)
        context = torch.tensor(self.scale(series.values[-self.config["data"]["context"] :]), dtype=torch.float32)
        (forecast,) = self.forecast(model, context[None])  # (H, T, Q)
        point = forecast[..., self.quantiles.index(0.5)] if self.quantiles else forecast[..., 0]
        times = series.future_times(len(forecast))
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")  # quotes a file name with a comma in it
        for h, time in enumerate(times):
            for t, name in enumerate(self.facts["names"][: self.facts["targets"]]):
                writer.writerow(
                    [
                        str(path),
                        time,
                        name,
                        f"{point[h, t]:.6g}",
                        *(f"{v:.6g}" for v in (forecast[h, t] if self.quantiles else [])),
                    ]
                )
        out.write(rows.getvalue())
        picture = self.run_dir / "forecasts" / f"{path.stem}.png"
        runs.make_dir(picture.parent)
        importance.draw_forecast(series, forecast, point, self.facts["names"][: self.facts["targets"]], picture)
        print(f"wrote {picture}", file=sys.stderr)

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        return [interop.onnx_graph(model, self.facts, self.config["data"]["context"])]

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        data = self.config["data"]
        return {
            "variables": self.facts["names"],
            "targets": self.facts["names"][: self.facts["targets"]],
            "context": data["context"],
            "horizon": data["horizon"],
            "quantiles": self.quantiles or [0.5],
            "frequency": self.facts["frequency"],
            "inputs": "values (B, context, variables): the last context steps of each variable in this order, no gaps",
            "outputs": "forecasts (B, horizon, targets, quantiles): the point forecast is the 0.5 quantile",
        }

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        """The last context window of the history file ``text``; ``draw`` adds the time-step and
        variable importances (importance.npz, PNGs, a printed ranking)."""
        path = Path(text)
        series = self.read_history(path)
        data, m = self.config["data"], self.config["model"]
        context = torch.tensor(self.scale(series.values[-data["context"] :]), dtype=torch.float32)
        device = next(model.parameters()).device
        labels = series.labels()[-data["context"] :]
        patches = [f"{labels[min(i * m['stride'], len(labels) - 1)]}" for i in range(model.forecaster.count)]

        found: dict[str, np.ndarray] = {}

        def measured(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # once, for the pictures and the page
            if not found:
                found.update(importance.measure(self, model, series, weights))
            return found

        def draw(weights: dict[str, np.ndarray], out_dir: Path) -> None:
            importance.explain(self, series, weights, measured(weights), out_dir)

        return AttentionExample(
            run=lambda: model(context[None].to(device)),
            tokens={"patches": patches, "variables": self.facts["names"]},
            axes=lambda name: ("variables", "variables") if name.startswith("forecaster.across") else ("patches", "patches"),
            draw=draw,
            page=lambda weights: importance.page(self, series, measured(weights)),
            meta={
                "patch": m["patch"],
                "stride": m["stride"],
                "context": data["context"],
                "times": labels,
                "temporal attention": f"of the first target, {self.facts['names'][0]}",
                "across attention": "at the first patch (importance.npz averages over patches)",
            },
        )
