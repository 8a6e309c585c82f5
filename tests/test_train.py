"""The trainer: schedules, learning, exact resume, stopping on a bad loss."""

from __future__ import annotations

import math
import os
import shutil
import signal

import pytest
import torch

from conftest import quiet, tiny_config
from tfkit import run as runs
from tfkit.errors import TfkitError, UsageError
from tfkit.optim import lr_factor
from tfkit.recipe import Loss
from tfkit.train import Interrupted, start_training

CPU = torch.device("cpu")


def test_noam_schedule_is_the_papers_formula_scaled_to_its_peak():
    d, warmup = 512, 4000
    factor = lr_factor({"warmup": warmup, "steps": 100_000, "schedule": "noam"})
    paper = lambda s: d**-0.5 * min(s**-0.5, s * warmup**-1.5)  # noqa: E731
    peak = paper(warmup)
    for step in (0, 10, 3999, 4000, 20_000):
        assert math.isclose(factor(step) * peak, paper(step + 1), rel_tol=1e-9)


def test_warmup_cosine_rises_then_decays_to_zero():
    factor = lr_factor({"warmup": 10, "steps": 110, "schedule": "warmup_cosine"})
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(59) == pytest.approx(0.5) and factor(109) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("train.schedule", "linear", "noam, warmup_cosine, constant"),
        ("train.optimizer", "sgd", "adam, adamw"),
        ("train.precision", "fp8", "auto, fp32, bf16, fp16"),
        ("train.best_mode", "lowest", "auto, min, max"),
    ],
)
def test_trainer_choices_fail_with_the_config_before_any_data_is_read(key, value, valid):
    with pytest.raises(UsageError, match=rf"unknown {key} '{value}' \(valid: {valid}\)"):
        tiny_config(f"{key}={value}")


def test_tiny_model_learns(trained_run):
    """The shared tiny run: loss falls steeply and held-out translations are mostly right."""
    records = [r for r in runs.read_metrics(trained_run) if "loss" in r]
    assert records[0]["step"] == 10 and records[-1]["step"] == 400
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    recipe, model = runs.open_run(trained_run)
    recipe.prepare(trained_run)
    metrics = recipe.evaluate(model, "test", beam=1)
    assert metrics["bleu"] > 80, metrics
    assert metrics["chrf"] > 90, metrics


def losses(run_dir):
    return {r["step"]: r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r}


def test_interrupted_and_resumed_run_logs_the_same_losses(tmp_path):
    sets = [
        "train.steps=12",
        "train.log_every=1",
        "train.save_every=5",
        "train.batch_size=16",
        "data.train_size=200",
        "model.dropout=0.3",
    ]
    config = tiny_config(*sets)
    straight = start_training(config, tmp_path / "straight", CPU, console=quiet())
    straight.fit(progress=False)

    def interrupt(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = start_training(config, tmp_path / "stopped", CPU, console=quiet())
    with pytest.raises(Interrupted, match="stopped by SIGINT at step 7.*--resume") as info:
        stopped.fit(on_step=interrupt, progress=False)
    assert info.value.exit_code == 128 + signal.SIGINT
    assert runs.load_state(runs.last_checkpoint(tmp_path / "stopped"))["step"] == 7

    torch.manual_seed(1234)  # the resumed run must restore its own RNG state, not rely on this one
    resumed = start_training(runs.read_config(tmp_path / "stopped"), tmp_path / "stopped", CPU, resume=True, console=quiet())
    assert resumed.step == 7
    resumed.fit(progress=False)
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(got) == list(range(1, 13))  # no step logged twice or lost
    assert got == expected


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    trainer = start_training(tiny_config("train.steps=3", "data.train_size=200"), tmp_path / "run", CPU, console=quiet())
    nan = Loss([(torch.tensor(float("nan"), requires_grad=True), 1)], 1)
    monkeypatch.setattr(trainer.recipe, "loss", lambda model, batch: nan)
    with pytest.raises(TfkitError, match="loss became nan at step 1"):
        trainer.fit(progress=False)
    assert runs.checkpoints(tmp_path / "run") == []  # nothing saved


def test_resume_refuses_a_state_from_another_step(trained_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    checkpoint = runs.last_checkpoint(run)
    state = torch.load(checkpoint / runs.STATE, weights_only=True)
    state["step"] -= 1
    torch.save(state, checkpoint / runs.STATE)
    with pytest.raises(UsageError, match="state.pt: is from step 399, not from this checkpoint's step 400"):
        runs.load_state(checkpoint)


def test_a_file_corpus_trains_from_a_memory_mapped_encoded_split(tmp_path):
    """The training split is encoded into an Arrow file once and read from it batch by batch, so a
    large corpus is not held in memory; a resumed run (and every other rank) reuses the encoding."""
    from tfkit import registry
    from tfkit.recipes.translation import BOS

    corpus = tmp_path / "pairs.tsv"
    corpus.write_text("source\ttarget\n" + "".join(f"eins {i}\tone {i}\n" for i in range(300)), encoding="utf-8")
    config = tiny_config(f"data.name={corpus}", "train.batch_size=16")
    recipe = registry.get("recipe", "translation")(config)
    recipe.prepare()
    assert recipe.train.cache_files, "the encoded training split lives in a file, not in memory"
    assert type(recipe.train_lengths) is list  # a datasets Column reads Arrow per item: sorting by it took seconds
    assert len(recipe.train) == len(recipe.train_lengths) > 250  # less what validation and test took
    batch = next(recipe.train_batches(0))
    assert batch["src"].shape[0] == 16 and (batch["tgt_in"][:, 0] == BOS).all()

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe.save(run_dir)
    again = registry.get("recipe", "translation")(config)
    again.prepare(run_dir)
    assert again.train.cache_files == recipe.train.cache_files
    assert all((a == b).all() for a, b in zip(next(again.train_batches(0)).values(), batch.values()))
