"""Training under torchrun: 2 CPU processes (gloo) take the same steps as one process on the same global
batch, for every recipe, with DDP and with FSDP; an interrupted 2-process run resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, quiet
from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.train import start_training

STEPS = 4
# tiny data, no dropout (ranks draw their own masks), a loss logged at every step
TINY_RUNS = {
    "translation": [
        *TINY["translation"],
        "data.train_size=300",
        "model.dropout=0.0",
        "train.batch_size=16",
        "train.accumulate=2",
    ],  # with accumulation
    "bert-pretrain": [*TINY["bert-pretrain"], "train.batch_size=16"],
    "bert-finetune": [*TINY["bert-finetune"], "model.dropout=0.0", "train.batch_size=16"],
    "vit": [*TINY["vit"], "train.batch_size=32"],
    "causal-lm": [*TINY["causal-lm"], "train.batch_size=8"],
    "conformer": [
        *TINY["conformer"],
        "data.train_size=60",
        "data.validation_size=8",
        "data.test_size=8",
        "model.dropout=0.0",
        "train.batch_size=6",
    ],
}


def sets(recipe: str, *more: str) -> list[str]:
    return [*TINY_RUNS[recipe], f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.save_every=100", *more]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in runs.read_metrics(run_dir) if "lr" in r}


def one_process(recipe: str, run_dir: Path, *more: str) -> dict[int, float]:
    config = configs.resolve(registry.get("recipe", recipe).default_config(), None, sets(recipe, *more))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: kernels then sum in the same order
    try:
        start_training(config, run_dir, torch.device("cpu"), console=quiet()).fit(progress=False)
    finally:
        torch.set_num_threads(threads)
    return losses(run_dir)


def torchrun(*args: str) -> list[str]:
    # one thread per process: two processes share the CI machine's two cores
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tfkit", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_two(recipe: str, run_dir: Path, *more: str) -> subprocess.CompletedProcess:
    command = torchrun(
        "train", recipe, "--out", str(run_dir), "--device", "cpu", *sum((["--set", s] for s in sets(recipe, *more)), [])
    )
    return subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """recipe → its one-process run, trained once for both strategies."""
    made: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in made:
            made[recipe] = tmp_path_factory.mktemp(f"one-{recipe}")
            one_process(recipe, made[recipe])
        return made[recipe]

    return get


# FSDP where a model has what sharding could get wrong: tied weights and gradient accumulation
# (translation), tied weights (causal-lm), batch-norm statistics (conformer); the others are plain
# stacks of the same blocks, wrapped by the same code
PARITY = [(recipe, "ddp") for recipe in TINY_RUNS] + [(recipe, "fsdp") for recipe in ("translation", "causal-lm", "conformer")]


@pytest.mark.parametrize("recipe, strategy", PARITY, ids=[f"{r}-{s}" for r, s in PARITY])
def test_two_processes_take_the_steps_of_one(recipe, strategy, single_run, tmp_path):
    one = single_run(recipe)
    single = losses(one)
    done = train_two(recipe, tmp_path / "two", f"train.strategy={strategy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(tmp_path / "two")  # rank 0 alone prints the run directory
    assert done.stderr.count("run directory") == 1  # and the progress
    double = losses(tmp_path / "two")
    assert sorted(double) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert double[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), (step, single, double)
    # the checkpoint holds whole (unsharded) weights that predict and evaluate can read
    assert runs.weights_step(runs.last_checkpoint(tmp_path / "two")) == STEPS
    weights = runs.open_run(tmp_path / "two")[1].state_dict()
    assert weights.keys() == runs.open_run(one)[1].state_dict().keys()
    # the final evaluation, whose batches the ranks shared, scores as one process's
    (metrics,), (expected,) = (
        [
            {k: v for k, v in r.items() if k not in ("split", "seconds")}
            for r in runs.read_metrics(run)
            if r.get("split") == "validation"
        ]
        for run in (tmp_path / "two", one)
    )
    assert metrics == pytest.approx(expected, rel=1e-5, abs=1e-5)


SMALL_EVAL_BATCHES = {
    "translation": ["decode.batch_size=16"],
    "bert-pretrain": ["train.batch_size=8"],
    "bert-finetune": ["predict.batch_size=8"],
    "vit": ["predict.batch_size=16"],
    "causal-lm": ["predict.batch_size=256"],
    "conformer": ["decode.batch_size=2"],
}
QA = ["task=qa", "data.max_length=64", "data.doc_stride=16"]


@pytest.mark.parametrize(
    "recipe, more",
    [(r, []) for r in TINY_RUNS] + [("bert-finetune", ["task=tag"]), ("bert-finetune", QA)],
    ids=[*TINY_RUNS, "bert-finetune-tag", "bert-finetune-qa"],
)
def test_processes_evaluate_shares_that_merge_into_one_evaluation(recipe, more):
    config = configs.resolve(
        registry.get("recipe", recipe).default_config(), None, [*TINY_RUNS[recipe], *SMALL_EVAL_BATCHES[recipe], *more]
    )
    task = registry.get("recipe", recipe)(config)
    task.prepare()
    torch.manual_seed(0)
    model = task.build_model()
    whole = task.eval_outputs(model, "validation")
    shares = [task.eval_outputs(model, "validation", rank, 3) for rank in range(3)]
    assert all(shares), [len(s) for s in shares]  # every process has work: the split spans 3+ batches
    assert sum(map(len, shares)) == len(whole)  # no item evaluated twice
    merged = {place: output for share in shares for place, output in share.items()}
    assert merged == whole  # so the merged outputs score as one process's validation does


def launch_until(command: list[str], run_dir: Path, steps: int) -> subprocess.Popen:
    """Start ``command`` and return once it has logged ``steps`` training steps in ``run_dir``."""
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    deadline = time.monotonic() + 300
    while not (run_dir / runs.METRICS).exists() or len(losses(run_dir)) < steps:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    return launcher


# torchrun signalled (its workers stopped in order) with the sharded checkpoint, and one rank dying alone
@pytest.mark.parametrize("strategy, signalled", [("fsdp", "torchrun"), ("ddp", "rank 1")])
def test_an_interrupted_two_process_run_resumes_exactly(strategy, signalled, tmp_path):
    steps = 30
    more = [f"train.steps={steps}"]
    single = one_process("translation", tmp_path / "one", *more)
    command = torchrun(
        "train",
        "translation",
        "--out",
        str(tmp_path / "two"),
        "--device",
        "cpu",
        *sum((["--set", s] for s in sets("translation", *more, f"train.strategy={strategy}")), []),
    )
    launcher = launch_until(command, tmp_path / "two", steps=3)
    if signalled == "torchrun":
        launcher.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks, not at the same instant
    else:  # one rank alone: the other learns of it in the step's all-reduce, and both stop at that step
        os.kill(children(launcher.pid)[1], signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert runs.last_checkpoint(tmp_path / "two") is not None, err[-3000:]
    stopped_at = runs.weights_step(runs.last_checkpoint(tmp_path / "two"))
    assert 3 <= stopped_at < steps, err[-3000:]
    assert "checkpoint saved" in err

    resumed = subprocess.run(
        torchrun("train", "--resume", str(tmp_path / "two"), "--device", "cpu"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    double = losses(tmp_path / "two")
    assert sorted(double) == list(range(1, steps + 1))  # no step lost or logged twice
    for step, loss in single.items():
        assert double[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), (step, stopped_at)


def test_a_batch_with_fewer_examples_than_processes_is_skipped(tmp_path):
    # 289 sentences in batches of 16: one epoch's 19 batches include one of a single sentence
    done = train_two("translation", tmp_path / "two", "data.train_size=289", "train.steps=20", "train.accumulate=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("skipped a training batch of 1 example(s), fewer than the 2 processes") == 1
    assert sorted(losses(tmp_path / "two")) == list(range(1, 21))


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[-1].split()[1] == str(pid):  # the field after the name is the parent
                found.append(int(stat.parent.name))
        except (OSError, IndexError):  # a process that ended meanwhile
            pass
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc")
def test_a_dead_process_stops_the_other_with_one_clear_line(tmp_path):
    command = torchrun(
        "train",
        "translation",
        "--out",
        str(tmp_path / "two"),
        "--device",
        "cpu",
        *sum((["--set", s] for s in sets("translation", "train.steps=100000")), []),
    )
    launcher = launch_until(command, tmp_path / "two", steps=2)
    workers = children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)  # no hang
    assert launcher.returncode != 0
    assert "lost contact with the other processes" in err, err[-3000:]


def test_bad_usage_under_torchrun_is_one_line(tmp_path):
    done = subprocess.run(
        torchrun("train", "translation", "--device", "cpu", "--set", "train.strategy=zero3"),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: unknown train.strategy 'zero3' (valid: ddp, fsdp)"]


def test_batch_norm_statistics_are_those_of_all_ranks():
    """Checked in-process with a gloo group of one against torch's batch norm of the real frames: the
    synced path (sums all-reduced) gives the same outputs, gradients and running statistics."""
    from torch import distributed as dist

    from tfkit.nn.conformer import MaskedBatchNorm1d

    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, requires_grad=True)
    mask = torch.arange(7)[None] < torch.tensor([7, 4, 2])[:, None]
    reference, synced = torch.nn.BatchNorm1d(5), MaskedBatchNorm1d(5)
    with torch.no_grad():
        reference.weight.uniform_()
        synced.weight.copy_(reference.weight)
    expected = x.new_zeros(x.shape)
    expected[mask] = reference(x[mask])
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = synced(x, mask)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(synced.running_mean, reference.running_mean)
    torch.testing.assert_close(synced.running_var, reference.running_var)
