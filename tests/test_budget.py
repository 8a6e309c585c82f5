"""A run that fits the time the user has (train.minutes, --time), and a long run that says how long."""

from __future__ import annotations

import io
import os
import signal

import pytest
import torch
from rich.console import Console

from conftest import one_error_line, quiet, tfkit, tiny_config
from tfkit import budget
from tfkit import config as configs
from tfkit import run as runs
from tfkit.errors import UsageError
from tfkit.train import Interrupted, start_training


@pytest.mark.parametrize("text, minutes", [("20m", 20), ("1h30m", 90), ("90s", 1.5), ("1.5h", 90), ("45", 45), (" 2m 30s", 2.5)])
def test_durations_read_as_people_write_them(text, minutes):
    assert budget.parse_duration(text) == pytest.approx(minutes)


def test_a_bad_duration_or_budget_is_one_line(capsys):
    code, _, err = tfkit(capsys, "train", "translation", "--time", "soon")
    assert code == 2
    one_error_line(err, "--time 'soon' is not a duration (write it as 20m, 1h30m, 90s or 1.5h)")
    with pytest.raises(UsageError, match="config key 'train.minutes' must be greater than 0, got -1"):
        tiny_config("train.minutes=-1")


def test_the_plan_spends_the_budget_on_steps_beside_the_validations():
    cfg = {"minutes": 10.0, "eval_every": 1000, "warmup": 400}
    planned = budget.plan(cfg, 600.0, budget.Probe(step_seconds=0.5, eval_seconds=10.0))
    # 600 s less 6 validations of 10 s, at 0.5 s a step
    assert planned == {"steps": 1080, "warmup": 108, "eval_every": 216, "save_every": 216}
    assert budget.plan({**cfg, "eval_every": 0}, 600.0, budget.Probe(0.5, 10.0))["eval_every"] == 0
    with pytest.raises(UsageError, match="leaves no time to train: a step takes 0.50 s and a validation 700.0 s"):
        budget.plan(cfg, 600.0, budget.Probe(0.5, 700.0))


def test_a_budgeted_run_ends_on_time_keeps_its_best_checkpoint_and_records_its_plan(tmp_path):
    minutes = 0.4
    config = tiny_config(f"train.minutes={minutes}", "train.keep_best=chrf", "train.steps=100000", "train.eval_every=1000")
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    metrics = trainer.fit(progress=False)
    # it stops once a step and the last validation would pass the budget: a step and a validation over at most
    assert trainer.seconds() < 60 * minutes * 1.5 + 5
    planned = configs.read_yaml(trainer.run_dir / runs.CONFIG)["train"]
    assert 0 < planned["steps"] < 100000 and planned["eval_every"] == max(1, planned["steps"] // budget.EVALUATIONS)
    header = (trainer.run_dir / runs.CONFIG).read_text(encoding="utf-8")
    assert f"#   train.steps: {planned['steps']} (planned for train.minutes {minutes:g}: " in header
    assert "#   data.max_tokens:" in header  # the data's own choices stay beside the plan
    validations = [r for r in runs.read_metrics(trainer.run_dir) if r.get("split") == "validation"]
    assert len(validations) >= 2 and metrics["chrf"] > 0
    best = max(validations, key=lambda r: r["chrf"])
    assert (
        runs.best_checkpoint(trainer.run_dir, runs.read_config(trainer.run_dir))
        == runs.checkpoints(trainer.run_dir)[
            [runs.checkpoint_step(c) for c in runs.checkpoints(trainer.run_dir)].index(best["step"])
        ]
    )


def test_a_long_run_says_how_long_it_will_take_and_how_to_ask_for_less(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=200)
    trainer = start_training(
        tiny_config("train.steps=200000", "train.log_every=2"), tmp_path / "run", torch.device("cpu"), console=console
    )
    with pytest.raises(Interrupted):
        trainer.fit(on_step=lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM), progress=False)
    (line,) = [line for line in out.getvalue().splitlines() if "to go" in line]
    assert line.startswith("train.steps 200,000 at ") and "--time 20m plans a run that fits 20 minutes" in line
