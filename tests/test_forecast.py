"""The forecast recipe: windows never see the future, scaling comes from the training part alone, the
backtest origins are the stated ones, a tiny model learns the planted series (with rotary positions
too) and its importances find the planted answer, also over a sample of the origins, predict writes
the forecast of each file and bad series are one clear line."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import one_error_line, quiet, straight_and_resumed_losses, tfkit
from tfkit import config as configs
from tfkit import registry
from tfkit.recipes.forecast.data import PLANTED_LAG, planted
from tfkit.run import read_metrics
from tfkit.train import start_training

# the planted series, one step ahead, with the encoder layer across variables: the target is the driver
# PLANTED_LAG steps earlier, so the driver must rank first, the noise last, and the driver's lag-6 step matter most
PLANTED = [
    "data.name=planted",
    "data.context=48",
    "data.horizon=1",
    "data.validation_size=200",
    "data.test_size=200",
    "model.cross_variable=true",
    "model.d_model=32",
    "model.d_ff=64",
    "model.dropout=0.0",
    "train.steps=600",
    "train.warmup=20",
    "train.log_every=10",
    "train.eval_every=0",
    "train.save_every=200",
    "baselines.steps=100",
    "baselines.seeds=1",  # set below the Transformer's 600 to keep the test short
]
# a daily file of the user's: two targets and a covariate, a weekly season
DATED = [
    "data.context=28",
    "data.horizon=7",
    "data.validation_size=56",
    "data.test_size=56",
    "data.targets=[sales,visits]",
    "data.covariates=[temperature]",
    "model.patch=7",
    "model.stride=7",
    "model.d_model=16",
    "model.d_ff=32",
    "model.quantiles=[0.1,0.5,0.9]",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=3",
]


def forecast_config(*sets: str) -> dict:
    return configs.resolve(registry.get("recipe", "forecast").default_config(), None, list(sets))


def daily_frame(days: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    week = np.sin(2 * np.pi * t / 7)
    return pd.DataFrame(
        {
            "date": pd.date_range("2024-01-01", periods=days, freq="D").strftime("%Y-%m-%d"),
            "sales": 100 + 10 * week + 0.05 * t + rng.normal(size=days),
            "visits": 50 + 5 * week + rng.normal(size=days),
            "temperature": 15 + 8 * np.sin(2 * np.pi * t / 365) + rng.normal(size=days),
        }
    )


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    trainer = start_training(
        forecast_config(*PLANTED), tmp_path_factory.mktemp("forecast") / "planted", torch.device("cpu"), console=quiet()
    )
    trainer.fit(progress=False)
    return trainer.run_dir


@pytest.fixture(scope="module")
def daily_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("daily") / "daily.csv"
    daily_frame().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def dated_run(daily_csv):
    config = forecast_config(f"data.name={daily_csv}", *DATED)
    trainer = start_training(config, daily_csv.parent / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer.run_dir


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_a_window_sees_only_the_steps_before_its_origin(position):
    recipe = registry.get("recipe", "forecast")(forecast_config(*PLANTED, f"model.position={position}"))
    recipe.prepare()
    torch.manual_seed(0)
    model = recipe.build_model()
    origin = int(recipe.origins["test"][10])
    context, future = recipe.windows(np.array([origin]))
    assert torch.equal(context[0], recipe.scaled[origin - 48 : origin]) and torch.equal(
        future[0, :, 0], recipe.scaled[origin : origin + 1, 0]
    )
    before = recipe.forecast(model, context)
    recipe.scaled[origin:] += 100.0  # the future changes...
    after_context, after_future = recipe.windows(np.array([origin]))
    assert np.array_equal(recipe.forecast(model, after_context), before)  # ...the forecast does not
    assert not torch.equal(after_future, future)


def test_the_scaling_and_the_mase_scale_come_from_the_training_part_alone(daily_csv, tmp_path):
    frame = daily_frame()
    recipe = registry.get("recipe", "forecast")(forecast_config(f"data.name={daily_csv}", *DATED))
    recipe.prepare()
    train_end = 400 - 56 - 56
    assert recipe.bounds == (train_end, 400 - 56)
    values = frame[["sales", "visits", "temperature"]].to_numpy()
    assert recipe.facts["mean"] == pytest.approx(values[:train_end].mean(0).tolist())
    assert recipe.facts["std"] == pytest.approx(values[:train_end].std(0).tolist())
    weekly = np.abs(values[7:train_end, :2] - values[: train_end - 7, :2]).mean(0)  # season 7, from the daily frequency
    assert recipe.facts["season"] == 7 and recipe.facts["mase_scale"] == pytest.approx(weekly.tolist())
    frame.loc[train_end:, ["sales", "visits", "temperature"]] *= 1000  # validation and test parts changed
    changed = tmp_path / "changed.csv"
    frame.to_csv(changed, index=False)
    other = registry.get("recipe", "forecast")(forecast_config(f"data.name={changed}", *DATED))
    other.prepare()
    assert other.facts == recipe.facts


def test_the_backtest_origins_are_the_stated_ones():
    recipe = registry.get("recipe", "forecast")(forecast_config())  # the default: weekly CO2
    recipe.prepare()
    steps, (train_end, validation_end) = len(recipe.series), recipe.bounds
    assert steps == 2284 and recipe.series.frequency.startswith("W") and recipe.series.season == 52
    assert (train_end, validation_end) == (2284 - 312 - 156, 2284 - 312)
    assert recipe.origins["train"][0] == 104 and recipe.origins["train"][-1] + 26 == train_end  # every horizon inside training
    assert list(recipe.origins["validation"]) == list(range(train_end, validation_end - 26 + 1, 4))
    assert list(recipe.origins["test"]) == list(range(validation_end, steps - 26 + 1, 4))
    assert len(recipe.origins["test"]) == 72


def test_the_tiny_model_learns_the_planted_series_and_beats_its_peers(planted_run, capsys):
    records = [r for r in read_metrics(planted_run) if "lr" in r]
    assert records[-1]["loss"] < records[0]["loss"] / 5  # 600 steps
    code, out, err = tfkit(capsys, "evaluate", str(planted_run), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["mase"] < 0.3  # 0.16 when written; the seasonal (here: last value) naive forecast is about 1
    peers = result["baselines"]
    assert {r.removesuffix(" [best classical on validation]") for r in peers} == {
        "seasonal naive (1)",
        "AutoARIMA (season 1)",
        "AutoETS (season 1)",
        "AutoTheta (season 1)",
        "DLinear (targets only; 1 seeds)",
        "LSTM (targets and covariates; 1 seeds)",
    }
    classical = [r for r in peers if r.startswith(("seasonal", "Auto"))]
    assert all(result["mase"] < peers[r]["mase"] for r in classical)  # none of them sees the driver
    kept = planted_run / "baselines.json"
    written = kept.stat().st_mtime_ns
    code, out, err = tfkit(capsys, "evaluate", str(planted_run))  # the table, from the kept baselines
    assert code == 0, err
    assert "this run" in out and "change" in out  # the rows' long names wrap in a narrow console
    assert kept.stat().st_mtime_ns == written  # nothing refitted


def test_the_neural_peers_get_the_transformers_steps_and_schedule(daily_csv, monkeypatch):
    from tfkit import optim

    recipe = registry.get("recipe", "forecast")(
        forecast_config(f"data.name={daily_csv}", *DATED, "train.warmup=2", "baselines.seeds=2")
    )
    recipe.prepare()
    assert recipe.config["baselines"]["steps"] == recipe.config["train"]["steps"] == 6
    used = []
    factor = optim.lr_factor
    monkeypatch.setattr(optim, "lr_factor", lambda cfg: used.append(dict(cfg)) or factor(cfg))
    truths = recipe.unscale(recipe.windows(recipe.origins["validation"])[1].numpy())
    rows = recipe._neural_baselines("validation", truths)
    assert len(used) == 4 and all(c == {**recipe.config["train"], "steps": 6} for c in used)  # 2 models, 2 seeds each
    assert used[0]["schedule"] == "warmup_cosine" and used[0]["warmup"] == 2
    assert all(r["mase_sd"] > 0 for r in rows.values())  # the seeds differ
    explicit = registry.get("recipe", "forecast")(forecast_config(f"data.name={daily_csv}", *DATED, "baselines.steps=3"))
    explicit.prepare()
    assert explicit.neural_budget()["steps"] == 3 and explicit.neural_budget()["schedule"] == recipe.config["train"]["schedule"]


def test_the_classical_peers_fit_on_the_training_part_and_forecast_from_the_history_alone():
    from tfkit.recipes.forecast import baselines as peers

    rng = np.random.default_rng(0)
    t = np.arange(240)
    values = (10 + 0.02 * t + np.sin(2 * np.pi * t / 7) + 0.3 * rng.normal(size=240))[:, None]
    train_end, origin = 160, 200
    changed = values.copy()
    changed[train_end:] += 5 * rng.normal(size=(80, 1))  # everything after the training part
    fitted = peers.fit_classical(values, train_end, 7, list(peers.CLASSICAL))
    refitted = peers.fit_classical(changed, train_end, 7, list(peers.CLASSICAL))
    assert list(fitted) == ["AutoARIMA (season 7)", "AutoETS (season 7)", "AutoTheta (season 7)"]
    for row in fitted:
        (model,), (other,) = fitted[row], refitted[row]
        # the same parameters: the forecast from the training part, and from any other history, agree
        for history in (values, changed):
            for at in (train_end, origin):
                np.testing.assert_array_equal(
                    peers.classical_forecasts([model], history, np.array([at]), 7),
                    peers.classical_forecasts([other], history, np.array([at]), 7),
                )
        before = peers.classical_forecasts([model], values, np.array([origin]), 7)
        future = values.copy()
        future[origin:] += 100.0  # the steps from the origin on change...
        np.testing.assert_array_equal(
            peers.classical_forecasts([model], future, np.array([origin]), 7), before
        )  # ...its forecast does not
        assert not np.array_equal(
            peers.classical_forecasts([model], future, np.array([origin + 7]), 7),
            peers.classical_forecasts([model], values, np.array([origin + 7]), 7),
        )


def test_the_percentage_is_against_the_best_classical_row_on_validation(daily_csv, monkeypatch):
    from tfkit.recipes.forecast import baselines as peers

    recipe = registry.get("recipe", "forecast")(
        forecast_config(f"data.name={daily_csv}", *DATED, "baselines.seeds=1", "baselines.classical=[autoets,autotheta]")
    )
    recipe.prepare()
    forecast = peers.classical_forecasts
    from statsforecast.models import AutoTheta

    def spoiled(models, values, origins, horizon):  # Theta made worse on validation alone, ETS on test alone
        out = forecast(models, values, origins, horizon)
        worse = origins[0] < recipe.bounds[1] if isinstance(models[0], AutoTheta) else origins[0] >= recipe.bounds[1]
        return out + (50.0 if worse else 0.0)

    monkeypatch.setattr(peers, "classical_forecasts", spoiled)
    result = recipe._fit_baselines("test")
    assert result["reference"] == "AutoETS (season 7) [best classical on validation]"
    assert result["validation"]["AutoETS (season 7)"]["mase"] < result["validation"]["AutoTheta (season 7)"]["mase"]
    assert (
        result["scores"]["AutoTheta (season 7)"]["mase"] < result["scores"][result["reference"]]["mase"]
    )  # better on test, not chosen


def test_the_importances_find_the_planted_driver_and_its_lag(planted_run, tmp_path, capsys):
    history = tmp_path / "history.csv"
    planted()[0].iloc[-400:].to_csv(history, index=False)
    code, out, err = tfkit(capsys, "inspect-attention", str(planted_run), str(history), "--out", str(tmp_path / "look"))
    assert code == 0, err
    found = np.load(tmp_path / "look" / "importance.npz")
    names = ["target", "driver", "noise"]
    ranked = [names[v] for v in np.argsort(-found["variables_permutation"])]
    assert ranked[0] == "driver" and ranked[-1] == "noise", found["variables_permutation"]
    assert found["variables_attention"].argmax() == 1  # the across-variable layer attends to the driver
    driver = found["occlusion"][1]  # (steps,): the driver's value that step mattered this much
    assert abs((len(driver) - int(driver.argmax())) - PLANTED_LAG) <= 1, driver.round(3)
    assert driver[-PLANTED_LAG - 2 : -PLANTED_LAG + 2].sum() > 0.5 * driver.sum()
    assert "variables ranked by permutation importance" in out and "driver" in out
    page = (tmp_path / "look" / "report.html").read_text()
    assert "variables ranked by permutation importance" in page and "step importance" in page
    for picture in ("series.png", "variables.png", "forecaster.across.layers.0.self_attn.png"):
        assert (tmp_path / "look" / picture).stat().st_size > 0


def test_permutation_importance_over_a_sample_of_the_origins_still_ranks_the_driver_first(planted_run, monkeypatch):
    from tfkit import run as runs
    from tfkit.recipes.forecast import importance

    recipe, model = runs.open_run(planted_run)
    recipe.prepare(planted_run)
    origins = np.arange(48, len(recipe.series))
    monkeypatch.setattr(importance, "MAX_ORIGINS", 64)  # the real 1024 is fewer than these 2952 too; sample far fewer
    seen = []
    forecast = recipe.forecast
    monkeypatch.setattr(recipe, "forecast", lambda model, contexts: seen.append(len(contexts)) or forecast(model, contexts))
    rise = importance.permutation(recipe, model, recipe.scaled, origins, seed=0)
    assert set(seen) == {64}  # spread over all of them, at most MAX_ORIGINS
    assert rise.argmax() == 1 and rise.argmin() == 2, rise  # the driver first, the noise last


def test_rotary_positions_act_in_the_temporal_encoder_and_the_model_learns(tmp_path):
    from tfkit.nn.position import NoPosition, RotaryPosition

    config = forecast_config(
        *PLANTED, "model.position=rotary", "model.feed_forward=glu", "train.steps=120", "train.save_every=120"
    )
    trainer = start_training(config, tmp_path / "rotary", torch.device("cpu"), console=quiet())
    forecaster = trainer.model.forecaster
    assert isinstance(forecaster.position, NoPosition)  # nothing added to the patch embeddings
    assert all(isinstance(layer.self_attn.rotary, RotaryPosition) for layer in forecaster.temporal.layers)
    assert all(layer.self_attn.rotary is None for layer in forecaster.across.layers)  # variables have no order
    before = trainer.recipe.evaluate(trainer.model, "validation")
    trainer.fit(progress=False)
    after = trainer.recipe.evaluate(trainer.model, "validation")
    assert after["mae"] < 0.65 * before["mae"], (before, after)  # 1.28 -> 0.71 in 120 steps when written


def test_predict_writes_the_dated_steps_after_each_file_with_intervals(dated_run, tmp_path, capsys):
    good = tmp_path / "recent.csv"
    daily_frame(60, seed=1).to_csv(good, index=False)
    short = tmp_path / "short.csv"
    daily_frame(20).to_csv(short, index=False)
    code, out, err = tfkit(capsys, "predict", str(dated_run), str(short), str(good))
    assert code == 2  # the bad file is reported, the good one still forecast
    assert "short.csv has 20 steps, fewer than the 28 the model reads (data.context)" in err
    rows = pd.read_csv(io.StringIO(out))
    assert list(rows.columns) == ["file", "time", "variable", "forecast", "q0.1", "q0.5", "q0.9"]
    last = pd.Timestamp(daily_frame(60, seed=1)["date"].iloc[-1])
    assert list(rows["time"].unique()) == [str((last + pd.Timedelta(days=d)).date()) for d in range(1, 8)]
    assert list(rows["variable"].unique()) == ["sales", "visits"] and len(rows) == 14 and set(rows["file"]) == {str(good)}
    code, out, _ = tfkit(capsys, "predict", str(dated_run), str(good), str(good))
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == 28  # one header, each file's rows
    assert (rows["q0.1"] <= rows["q0.9"]).all() and np.allclose(rows["forecast"], rows["q0.5"])
    assert (dated_run / "forecasts" / "recent.png").stat().st_size > 0


def test_the_onnx_graph_forecasts_in_the_series_units_as_predict_does(dated_run, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    recent = tmp_path / "recent.csv"
    daily_frame(60, seed=1).to_csv(recent, index=False)
    code, out, err = tfkit(capsys, "predict", str(dated_run), str(recent))
    assert code == 0, err
    predicted = pd.read_csv(io.StringIO(out))[["q0.1", "q0.5", "q0.9"]].to_numpy()
    code, _, err = tfkit(capsys, "export", str(dated_run), str(tmp_path / "onnx"), "--to", "onnx")
    assert code == 0, err
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert meta["variables"] == ["sales", "visits", "temperature"] and meta["quantiles"] == [0.1, 0.5, 0.9]
    values = daily_frame(60, seed=1)[meta["variables"]].to_numpy(np.float32)[-meta["context"] :]
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (forecasts,) = session.run(None, {"values": np.stack([values, values * 1.1])})
    assert forecasts.shape == (2, 7, 2, 3)
    np.testing.assert_allclose(forecasts[0].reshape(-1, 3), predicted, rtol=1e-4)


def test_training_resumes_exactly(daily_csv, tmp_path):
    straight, resumed = straight_and_resumed_losses(forecast_config(f"data.name={daily_csv}", *DATED), tmp_path)
    assert len(straight) == 6 and resumed == straight


def bad_series(tmp_path, name: str) -> tuple[str, str]:
    """A daily file broken one way, and the line that must say so."""
    frame = daily_frame(200)
    path = tmp_path / f"{name}.csv"
    if name == "text":
        frame["sales"] = frame["sales"].astype(str)
        frame.loc[17, "sales"] = "about 100"
        expected = f"{path}: column 'sales' is not numeric (row 18: 'about 100')"
    elif name == "time":
        frame.loc[9, "date"] = "not a date"
        expected = f"{path}: time column 'date' row 10 is not a time: 'not a date'"
    elif name == "duplicate":
        frame.loc[5, "date"] = frame.loc[4, "date"]
        expected = f"{path}: 1 duplicated times in 'date', the first 2024-01-05"
    elif name == "gap":
        frame.loc[30:69, "visits"] = np.nan
        expected = f"{path}: column 'visits' misses 40 values in a row"
    else:  # a column the config names is not there
        frame = frame.drop(columns=["temperature"])
        expected = f"{path} has no column 'temperature'"
    frame.to_csv(path, index=False)
    return str(path), expected


@pytest.mark.parametrize("name", ["text", "time", "duplicate", "gap", "column"])
def test_a_bad_series_is_one_clear_line(name, tmp_path, capsys):
    path, expected = bad_series(tmp_path, name)
    code, _, err = tfkit(
        capsys, "train", "forecast", "--data", path, *[f"--set={s}" for s in DATED], "--out", str(tmp_path / "run")
    )
    assert code == 2
    one_error_line(err, expected)


def test_a_series_too_short_for_its_parts_says_what_to_shorten(daily_csv, tmp_path, capsys):
    code, _, err = tfkit(
        capsys,
        "train",
        "forecast",
        "--data",
        str(daily_csv),
        *[f"--set={s}" for s in DATED],
        "--set",
        "data.test_size=330",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 2
    one_error_line(err, "left to train on, fewer than one window")
