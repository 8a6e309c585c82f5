"""Shared fixtures: a private data cache, tiny translation configs and one trained tiny run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tfkit import config as configs
from tfkit import registry
from tfkit.train import start_training

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


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated corpora and datasets' own cache go to a temporary folder, never the user's."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["TFKIT_CACHE"] = str(root / "tfkit")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"


def tiny_config(*sets: str) -> dict:
    defaults = registry.get("recipe", "translation").default_config()
    return configs.resolve(defaults, None, [*TINY, *sets])


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, private_caches: None) -> Path:
    """A tiny German→English model trained on the built-in corpus; shared by the tests that read a run."""
    trainer = start_training(tiny_config(), tmp_path_factory.mktemp("runs") / "tiny", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    return trainer.run_dir
