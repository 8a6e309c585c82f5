"""Shared by every test module: a private data cache, each recipe's tiny config, running the CLI in
this process, and the one trained tiny translation run."""

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
from tfkit.cli import main
from tfkit.train import Interrupted, start_training

registry.load_all()

# Each recipe's tiny run, written once: small enough to train in seconds to a minute on 2 cores, large
# enough that the recipe's own tests can hold it to a stated accuracy. Tests add what they change.
TINY = {
    # German → English: English number words are several words long, so BLEU means something
    "translation": [
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
    ],
    "bert-pretrain": [
        "data.vocab_size=600",
        "model.d_model=64",
        "model.heads=4",
        "model.d_ff=128",
        "model.layers=2",
        "model.dropout=0.0",
        "train.steps=700",
        "train.batch_size=64",
        "train.lr=0.002",
        "train.warmup=50",
        "train.eval_every=0",
        "train.log_every=10",
        "train.save_every=700",
        "data.max_length=32",
    ],
    "bert-finetune": [
        "data.vocab_size=600",
        "model.d_model=64",
        "model.heads=4",
        "model.d_ff=128",
        "model.layers=2",
        "train.steps=150",
        "train.lr=0.001",
        "train.warmup=15",
        "train.eval_every=0",
        "train.log_every=10",
        "train.save_every=150",
        "data.max_length=48",
    ],
    "vit": [
        "model.patch=4",
        "model.d_model=48",
        "model.depth=2",
        "model.d_ff=96",
        "model.drop_path=0.0",
        "augment.crop_scale=[1.0, 1.0]",
        "train.steps=200",
        "train.lr=0.003",
        "train.warmup=30",
        "train.eval_every=0",
        "train.log_every=10",
        "train.save_every=100",
    ],
    "causal-lm": [
        "data.vocab_size=512",
        "data.block_size=64",
        "model.d_model=64",
        "model.heads=4",
        "model.d_ff=256",
        "model.layers=2",
        "model.max_positions=128",
        "train.steps=300",
        "train.batch_size=16",
        "train.lr=0.003",
        "train.warmup=30",
        "train.log_every=10",
        "train.eval_every=0",
        "train.save_every=300",
    ],
    "conformer": [
        "data.train_size=500",
        "data.validation_size=40",
        "data.test_size=40",
        "model.subsampling_channels=32",
        "model.d_model=96",
        "model.heads=4",
        "model.d_ff=192",
        "model.layers=2",
        "model.kernel_size=7",
        "train.steps=400",
        "train.batch_size=16",
        "train.lr=0.003",
        "train.warmup=60",
        "train.eval_every=0",
        "train.log_every=10",
        "train.save_every=200",
    ],
}


def recipe_config(recipe: str, *sets: str) -> dict:
    """The recipe's tiny config with ``sets`` laid over it, resolved and checked."""
    return configs.resolve(registry.get("recipe", recipe).default_config(), None, [*TINY.get(recipe, []), *sets])


def tiny_config(*sets: str) -> dict:
    return recipe_config("translation", *sets)


def as_sets(items: list[str]) -> list[str]:
    """Config overrides as ``--set`` arguments."""
    return [arg for item in items for arg in ("--set", item)]


def tfkit(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, fragment: str) -> None:
    """Exactly one ``error:`` line, holding ``fragment``, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err


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
