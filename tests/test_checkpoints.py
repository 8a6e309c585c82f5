"""Nothing is lost when training is killed: checkpoints that survive SIGKILL at any instant and a full
disk, the best checkpoint and early stopping, and damaged run files named in one line."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, one_error_line, quiet, tfkit, tiny_config
from tfkit import run as runs
from tfkit.errors import TfkitError
from tfkit.train import start_training

# a model small enough that a step and its save take a few milliseconds; a checkpoint every step
KILLS = 10
KILLED = [
    *TINY["translation"],
    "data.train_size=600",
    "train.steps=120",
    "train.log_every=1",
    "train.save_every=1",
    "train.warmup=20",
]


def train_command(run_dir: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "tfkit", "train", "--resume", str(run_dir)]
    return [
        sys.executable,
        "-m",
        "tfkit",
        "train",
        "translation",
        "--out",
        str(run_dir),
        *sum((["--set", s] for s in KILLED), []),
    ]


def training_losses(run_dir: Path) -> dict[int, float]:
    records = [r for r in runs.read_metrics(run_dir) if "lr" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path):
    """Kill -9 over and over (in start-up, in steps, inside saves), resume each time: the finished run
    has the loss of every step and the weights of a run never interrupted."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = subprocess.run(train_command(tmp_path / "straight", False), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = training_losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 121))

    rng = random.Random(0)
    run_dir = tmp_path / "killed"
    kills = inside_save = last_step = 0
    for attempt in range(KILLS + 1):
        process = subprocess.Popen(
            train_command(run_dir, resume=attempt > 0), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if attempt == KILLS:  # enough: the last resume runs to the end (each kill costs a start-up of seconds)
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-2000:]
            break
        if attempt % 4 == 3:  # now and then while it starts up (reading the run, building the model)
            time.sleep(rng.uniform(0.5, 4.0))
        else:  # otherwise once it trains again: in a step, a save, or removing an old checkpoint
            started = time.monotonic()
            while process.poll() is None and time.monotonic() - started < 120:
                found = runs.last_checkpoint(run_dir)
                if found is not None and runs.checkpoint_step(found) > last_step:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            _, err = process.communicate()
            assert process.returncode == 0, err[-2000:]
            break
        process.send_signal(signal.SIGKILL)  # only the process this test started
        process.communicate()
        kills += 1
        inside_save += any((run_dir / runs.CHECKPOINTS).glob(".step-*"))
        last = runs.last_checkpoint(run_dir)
        if last is not None:  # whatever the moment, the latest checkpoint is whole and matches itself
            last_step = runs.checkpoint_step(last)
            assert runs.load_state(last)["step"] == runs.weights_step(last) == last_step
    else:
        pytest.fail("training never finished")

    assert kills >= KILLS // 2, f"only {kills} kills before training finished"
    print(f"\nsurvived {kills} SIGKILLs, {inside_save} of them inside a save")
    got = training_losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    theirs = load_file(str(runs.last_checkpoint(tmp_path / "straight") / runs.WEIGHTS))
    ours = load_file(str(runs.last_checkpoint(run_dir) / runs.WEIGHTS))
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6)
    assert [p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()] == ["step-00000120"]  # keep_last 1, nothing left over


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny_config("train.steps=4", "train.save_every=2", "data.train_size=300")
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    real_save = torch.save

    def full_disk(state, path, *args, **kwargs):
        if state.get("step") == 4:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        TfkitError,
        match=r"could not save the checkpoint of step 4 \(No space left on device\); the checkpoint of step 2 is whole",
    ):
        trainer.fit(progress=False)
    assert [p.name for p in (tmp_path / "run" / runs.CHECKPOINTS).iterdir()] == ["step-00000002"]
    assert runs.load_state(runs.last_checkpoint(tmp_path / "run"))["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    resumed = start_training(config, tmp_path / "run", torch.device("cpu"), resume=True, console=quiet())
    assert resumed.step == 2
    resumed.fit(progress=False)
    assert runs.checkpoint_step(runs.last_checkpoint(tmp_path / "run")) == 4


def test_a_real_full_filesystem(tmp_path, capsys):
    """A tmpfs with room for the run and one checkpoint, not for a second one beside it."""
    sets = sum((["--set", s] for s in [*TINY["translation"], "data.train_size=300", "train.steps=6", "train.save_every=3"]), [])
    code, _, err = tfkit(capsys, "train", "translation", "--out", str(tmp_path / "sized"), "--max-steps", "3", *sets)
    assert code == 0, err
    size = sum(p.stat().st_size for p in (tmp_path / "sized").rglob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("this machine does not let the tests mount a small filesystem (the test above makes the write fail instead)")
    try:
        code, _, err = tfkit(capsys, "train", "translation", "--out", str(mount / "run"), *sets)
        assert code == 1
        one_error_line(
            err, "could not save the checkpoint of step 6 (No space left on device); the checkpoint of step 3 is whole"
        )
        (checkpoint,) = runs.checkpoints(mount / "run")
        assert runs.load_state(checkpoint)["step"] == 3
        assert not [p for p in mount.rglob(".*")]  # the failed save took its files with it
        shutil.copytree(mount / "run", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    code, _, err = tfkit(capsys, "train", "--resume", str(tmp_path / "moved"))
    assert code == 0, err
    assert runs.checkpoint_step(runs.last_checkpoint(tmp_path / "moved")) == 6


def test_keep_best_and_keep_last_and_the_checkpoint_option(tmp_path, capsys):
    config = tiny_config(
        "train.steps=300",
        "train.eval_every=50",
        "train.save_every=50",
        "train.keep_last=2",
        "train.keep_best=exact_match",
        "data.validation_size=40",
    )
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    run_dir = trainer.run_dir
    scores = {r["step"]: r["exact_match"] for r in runs.read_metrics(run_dir) if r.get("split") == "validation"}
    best_step = min(scores, key=lambda s: (-scores[s], s))  # the first of the highest
    kept = [runs.checkpoint_step(c) for c in runs.checkpoints(run_dir)]
    assert kept == sorted({best_step, 250, 300}), (kept, scores)
    assert runs.checkpoint_step(runs.pick_checkpoint(run_dir, config, "best")) == best_step
    assert runs.checkpoint_step(runs.pick_checkpoint(run_dir, config, "auto")) == best_step
    assert runs.checkpoint_step(runs.pick_checkpoint(run_dir, config, "last")) == 300
    for which in ("best", "last"):
        code, out, err = tfkit(capsys, "evaluate", str(run_dir), "--split", "validation", "--json", "--checkpoint", which)
        assert code == 0, err
        assert json.loads(out)["exact_match"] == pytest.approx(scores[best_step if which == "best" else 300])
    code, _, err = tfkit(capsys, "predict", str(run_dir), "x.txt", "--checkpoint", "middle")
    assert code == 2
    one_error_line(err, "unknown --checkpoint 'middle' (valid: auto, best, last)")


def test_no_best_checkpoint_without_keep_best(trained_run, capsys):
    code, _, err = tfkit(capsys, "evaluate", str(trained_run), "--checkpoint", "best")
    assert code == 2
    one_error_line(err, "has no best checkpoint (it was trained without train.keep_best; use --checkpoint last)")


def test_early_stopping_and_its_resume(tmp_path):
    """A loss that cannot improve for long (lr tiny after warm-up): patience 2 stops two validations
    after the best, and a resumed run counts the validations before the stop."""
    config = tiny_config(
        "train.steps=400",
        "train.eval_every=20",
        "train.save_every=1000",
        "train.keep_best=exact_match",
        "train.patience=2",
        "data.validation_size=20",
        "train.lr=1e-7",
    )
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    validations = [r for r in runs.read_metrics(trainer.run_dir) if r.get("split") == "validation"]
    best = runs.best_record(validations, config)
    assert trainer.step < 400 and trainer.step == validations[-1]["step"]
    assert [r["step"] for r in validations if r["step"] > best["step"]] == [best["step"] + 20, best["step"] + 40]
    resumed = start_training(config, trainer.run_dir, torch.device("cpu"), resume=True, console=quiet())
    assert (resumed.best["step"], resumed.evals_since_best) == (best["step"], 2)


def test_keep_best_must_name_a_metric_the_recipe_reports(tmp_path):
    config = tiny_config("train.steps=2", "train.eval_every=1", "train.keep_best=accuracy", "data.train_size=300")
    trainer = start_training(config, tmp_path / "run", torch.device("cpu"), console=quiet())
    with pytest.raises(TfkitError, match=r"train.keep_best 'accuracy' is not a validation metric of this run \(valid: .*bleu"):
        trainer.fit(progress=False)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path):
    config = tiny_config("train.steps=6", "data.train_size=300", "train.log_every=1")
    straight = start_training(config, tmp_path / "straight", torch.device("cpu"), console=quiet())
    straight.fit(progress=False)
    early = start_training(config, tmp_path / "early", torch.device("cpu"), console=quiet())
    assert runs.checkpoints(early.run_dir) == []  # killed here: config and tokenizer written, no checkpoint
    resumed = start_training(config, early.run_dir, torch.device("cpu"), resume=True, console=quiet())
    resumed.fit(progress=False)
    assert training_losses(early.run_dir) == training_losses(straight.run_dir)


# -- damaged run directories ------------------------------------------------------------------------
def last_file(run_dir: Path, name: str) -> Path:
    return runs.last_checkpoint(run_dir) / name if name in (runs.WEIGHTS, runs.STATE) else run_dir / name


def other_model_weights(path: Path, tmp_path: Path) -> None:
    run = start_training(
        tiny_config("train.steps=1", "model.d_model=32", "data.train_size=300"),
        tmp_path / "other",
        torch.device("cpu"),
        console=quiet(),
    )
    run.fit(progress=False)
    shutil.copy(runs.last_checkpoint(run.run_dir) / runs.WEIGHTS, path)


def renamed_weights(path: Path, tmp_path: Path) -> None:
    """The same tensors under other names: another model's file of the same sizes."""
    from safetensors.torch import load_file, save_file

    save_file({f"other.{name}": tensor for name, tensor in load_file(path).items()}, path)


def pickled_object(path: Path, tmp_path: Path) -> None:
    import argparse

    torch.save({**torch.load(path, weights_only=True), "options": argparse.Namespace(lr=1)}, path)


DAMAGE = {
    "cut short": lambda path, tmp: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
    "garbage": lambda path, tmp: path.write_bytes(os.urandom(4096)),
    "empty": lambda path, tmp: path.write_bytes(b""),
}
CASES = [
    (runs.WEIGHTS, "cut short", "damaged, not a whole safetensors file"),
    (runs.WEIGHTS, "garbage", "damaged, not a whole safetensors file"),
    (runs.WEIGHTS, "empty", "damaged, not a whole safetensors file"),
    (runs.WEIGHTS, "another model", "holds weights of other sizes than config.yaml's model"),
    (runs.WEIGHTS, "other names", "tensors unexpected, e.g. other."),
    (runs.TOKENIZER, "cut short", "not a tokenizer file"),
    (runs.TOKENIZER, "garbage", "not a tokenizer file"),
    (runs.TOKENIZER, "edited", "not a tokenizer file"),
    (runs.CONFIG, "yaml syntax", "not valid YAML at line 3 (expected ',' or ']'"),
    (runs.CONFIG, "out of range", "config key 'model.d_model' must be at least 1, got -5"),
    (runs.CONFIG, "unknown key", "unknown config key 'model.width'"),
    (runs.CONFIG, "garbage", "config.yaml: "),
    (runs.STATE, "cut short", "damaged, not a whole checkpoint"),
    (runs.STATE, "garbage", "damaged, not a whole checkpoint"),
    (runs.STATE, "python objects", "holds Python objects besides tensors and plain data"),
    (runs.STATE, "another run", "does not fit this run's model and optimiser"),
]
EDITS = {
    "another model": other_model_weights,
    "other names": renamed_weights,
    "edited": lambda path, tmp: path.write_text('{"version": "1.0", 3: [}', encoding="utf-8"),
    "yaml syntax": lambda path, tmp: path.write_text("recipe: translation\nmodel: {d_model: [64\n", encoding="utf-8"),
    "out of range": lambda path, tmp: path.write_text(
        path.read_text(encoding="utf-8").replace("d_model: 64", "d_model: -5"), encoding="utf-8"
    ),
    "unknown key": lambda path, tmp: path.write_text(
        path.read_text(encoding="utf-8").replace("d_model: 64", "d_model: 64\n  width: 3"), encoding="utf-8"
    ),
    "python objects": pickled_object,
    "another run": lambda path, tmp: torch.save(
        {**torch.load(path, weights_only=True), "optimizer": {"state": {}, "param_groups": []}}, path
    ),
}
COMMANDS = {
    runs.WEIGHTS: ["predict", "evaluate", "inspect-attention", "resume"],
    runs.TOKENIZER: ["predict", "evaluate", "inspect-attention", "resume"],
    runs.CONFIG: ["predict", "evaluate", "inspect-attention", "resume"],
    runs.STATE: ["resume"],  # predict, evaluate and inspect-attention read no optimiser state
}


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    config = tiny_config("train.steps=2", "data.train_size=300", "data.validation_size=20", "data.test_size=20")
    trainer = start_training(config, tmp_path_factory.mktemp("healthy") / "run", torch.device("cpu"), console=quiet())
    trainer.fit(progress=False)
    (trainer.run_dir / "sentences.txt").write_text("drei\n", encoding="utf-8")
    return trainer.run_dir


@pytest.mark.parametrize("name, damage, message", CASES, ids=[f"{n}-{d}" for n, d, _ in CASES])
def test_a_damaged_run_file_is_one_line_naming_it_for_every_command(healthy_run, tmp_path, capsys, name, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(healthy_run, run_dir)
    path = last_file(run_dir, name)
    (DAMAGE.get(damage) or EDITS[damage])(path, tmp_path)
    for command in COMMANDS[name]:
        args = {
            "predict": ["predict", str(run_dir), str(run_dir / "sentences.txt")],
            "evaluate": ["evaluate", str(run_dir)],
            "inspect-attention": ["inspect-attention", str(run_dir), "drei", "--out", str(tmp_path / "attention")],
            "resume": ["train", "--resume", str(run_dir), "--max-steps", "3"],
        }[command]
        code, _, err = tfkit(capsys, *args)
        assert code == 2, (command, err)
        one_error_line(err, f"{path}: ")
        one_error_line(err, message)


def test_a_damaged_metrics_file_does_not_stop_resume(healthy_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(healthy_run, run_dir)
    lines = (run_dir / runs.METRICS).read_text(encoding="utf-8").splitlines()
    lines.insert(1, "garbage {")
    lines.insert(2, '["a list"]')
    (run_dir / runs.METRICS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = tfkit(capsys, "train", "--resume", str(run_dir), "--max-steps", "3")
    assert code == 0, err
    assert "metrics.jsonl: line 2 is not a metrics record; skipped" in err
    assert "metrics.jsonl: line 3 is not a metrics record; skipped" in err
    assert [r["step"] for r in runs.read_metrics(run_dir) if "lr" in r][-1] == 3
