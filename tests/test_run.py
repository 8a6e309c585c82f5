"""The run directory alone is enough to rebuild the trained model."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import quiet, tiny_config
from tfkit import config as configs
from tfkit import run as runs
from tfkit.errors import UsageError
from tfkit.train import start_training


def test_round_trip_rebuilds_the_same_model_from_a_moved_directory(tmp_path):
    config = tiny_config("train.steps=5", "data.train_size=300")
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    moved = tmp_path / "elsewhere"
    shutil.move(trainer.run_dir, moved)
    assert {p.name for p in moved.iterdir()} == {"config.yaml", "checkpoints", "tokenizer.json", "metrics.jsonl"}
    assert configs.read_yaml(moved / runs.CONFIG) == config
    (checkpoint,) = runs.checkpoints(moved)
    assert checkpoint.name == "step-00000005" and {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "state.pt"}
    assert runs.load_state(checkpoint)["step"] == 5 and runs.weights_step(checkpoint) == 5

    recipe, model = runs.open_run(moved)
    batch = next(trainer.recipe.train_batches(0))
    trainer.model.eval()
    torch.testing.assert_close(model(batch["src"], batch["tgt_in"]), trainer.model(batch["src"], batch["tgt_in"]), rtol=0, atol=0)
    sources = trainer.recipe.sources["test"][:8]
    assert recipe.translate(model, sources) == trainer.recipe.translate(trainer.model, sources)


def test_no_partial_files_are_left_behind(trained_run):
    assert not [p.name for p in trained_run.rglob("*") if p.name.startswith(".")]


def test_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UsageError, match="has no config.yaml"):
        runs.open_run(tmp_path)


def test_a_metrics_record_cut_short_is_skipped_and_dropped_on_resume(tmp_path):
    """A crash (or a reader racing the writer) can meet a last line without its newline."""
    runs.append_metrics(tmp_path, {"step": 1, "loss": 2.0})
    with open(tmp_path / runs.METRICS, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "lo')
    assert runs.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
    runs.truncate_metrics(tmp_path, 5)
    assert (tmp_path / runs.METRICS).read_text(encoding="utf-8") == '{"step": 1, "loss": 2.0}\n'
