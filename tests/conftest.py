"""Shared fixtures: a private data cache, tiny translation configs and one trained tiny run."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

# generated corpora and datasets' own cache go to a temporary folder, never the user's; set before
# datasets is imported, which reads HF_DATASETS_CACHE once
CACHE = Path(tempfile.mkdtemp(prefix="tfkit-tests-"))
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
os.environ.update(TFKIT_CACHE=str(CACHE / "tfkit"), HF_DATASETS_CACHE=str(CACHE / "hf"), HF_HUB_OFFLINE="1")

import pytest
import torch
from rich.console import Console

from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.train import Interrupted, start_training

registry.load_all()

# German → English: English number words are several words long, so BLEU means something
TINY = [
    "data.source_lang=de",
    "data.target_lang=en",
    "data.train_size=3000",
    "data.validation_size=100",
    "data.test_size=100",
    "data.max_number=9999",
    "data.vocab_size=150",
    "model.d_model=64",
    "model.heads=4",
    "model.d_ff=128",
    "model.encoder.layers=2",
    "model.decoder.layers=2",
    "train.steps=400",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.warmup=60",
    "train.log_every=10",
    "train.eval_every=0",
    "train.save_every=100",
    "decode.beam=3",
]


def tiny_config(*sets: str) -> dict:
    defaults = registry.get("recipe", "translation").default_config()
    return configs.resolve(defaults, None, [*TINY, *sets])


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny German→English model trained on the built-in corpus; shared by the tests that read a run."""
    trainer = start_training(tiny_config(), tmp_path_factory.mktemp("runs") / "tiny", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer.run_dir


def straight_and_resumed_losses(config: dict, root: Path, stop_at: int = 3) -> tuple[dict, dict]:
    """Train ``config`` straight through, and again stopped by SIGTERM after ``stop_at`` steps and
    resumed; returns each run's {step: training loss}."""
    straight = start_training(config, root / "straight", torch.device("cpu"), console=quiet())
    straight.fit(progress=False)
    stopped = start_training(config, root / "stopped", torch.device("cpu"), console=quiet())
    with pytest.raises(Interrupted):
        stopped.fit(on_step=lambda step: step == stop_at and os.kill(os.getpid(), signal.SIGTERM), progress=False)
    resumed = start_training(config, root / "stopped", torch.device("cpu"), resume=True, console=quiet())
    resumed.fit(progress=False)
    return tuple({r["step"]: r["loss"] for r in runs.read_metrics(root / name) if "lr" in r} for name in ("straight", "stopped"))
