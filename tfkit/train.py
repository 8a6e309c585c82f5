"""One training loop for every recipe.

The optimiser, its schedule and autocast (tfkit.optim), gradient accumulation and clipping,
periodic evaluation, metrics, checkpoints that survive a kill at any instant (tfkit.run), the best
checkpoint by a validation metric and early stopping on it, exact resume, and a clean stop on
SIGINT/SIGTERM.

Exact resume rests on one rule: data order and data randomness come from generators seeded by
(seed, epoch) inside the recipe, and the model's own randomness (dropout) from the global RNG, whose
state is checkpointed. Replaying the same batches with the same RNG state gives the same losses.

Under torchrun (tfkit.distributed) every rank draws the same global batches and trains on its slice;
losses are divided by the global counts, so N ranks take the step one process would take.
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from tfkit import budget, distributed, registry
from tfkit import run as runs
from tfkit.distributed import Ranks
from tfkit.errors import TfkitError, UsageError, first_line
from tfkit.nn.linear import packed_weights
from tfkit.optim import autocast_dtype, build_optimizer, lr_factor
from tfkit.recipe import Recipe


class Interrupted(TfkitError):
    """Training stopped by a signal after saving a checkpoint."""

    every_rank = True

    def __init__(self, signum: int, run_dir: Path, step: int):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved "
            f"(continue with: tfkit train --resume {run_dir})"
        )
        self.exit_code = 128 + signum


class NonFiniteLoss(TfkitError):
    every_rank = True  # the loss is reduced over ranks before the check


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device '{name}' (valid: auto, cpu, cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def check_best_options(cfg: dict[str, Any]) -> None:
    if cfg["keep_best"] is not None and not isinstance(cfg["keep_best"], str):
        raise UsageError(f"train.keep_best names a validation metric (for example accuracy or bleu), got {cfg['keep_best']!r}")
    if cfg["patience"] and not cfg["keep_best"]:
        raise UsageError("train.patience needs train.keep_best, the validation metric to wait on")


class Trainer:
    """Trains one recipe's model in one run directory: the optimiser and schedule of ``train:``,
    autocast, accumulation and clipping, evaluation every ``train.eval_every`` steps, checkpoints
    (the latest ``train.keep_last`` and the best by ``train.keep_best``), exact resume, and a stop
    that saves on SIGINT/SIGTERM. Under torchrun every rank holds one; rank 0 writes the run.

    The recipe supplies everything task-specific (batches, loss, metrics); the trainer never looks
    inside a batch beyond moving it to the device and counting its first tensor's rows."""

    def __init__(
        self,
        recipe: Recipe,
        model: nn.Module,
        run_dir: Path,
        device: torch.device,
        console: Console | None = None,
        ranks: Ranks = Ranks(),
    ):
        self.recipe, self.run_dir, self.device, self.ranks = recipe, run_dir, device, ranks
        self.cfg = recipe.config["train"]
        if ranks.active and self.cfg["batch_size"] < ranks.world:
            raise UsageError(
                f"train.batch_size {self.cfg['batch_size']} is the global batch: it must be at least the {ranks.world} processes"
            )
        self.model = model.to(device)
        blocks = tuple(registry.get("block", name) for name in registry.names("block"))
        self.wrapped = distributed.wrap(self.model, ranks, self.cfg["strategy"], device, blocks)
        self.sharded = ranks.active and self.cfg["strategy"] == "fsdp"
        self._copy: nn.Module | None = None  # the unsharded copy FSDP's weights are gathered into
        # training steps run the compiled graph; evaluation and decoding, whose shapes change every
        # call, and checkpoints (no "_orig_mod." prefixes) use the eager module, which shares its weights
        self.step_model = torch.compile(self.wrapped) if self.cfg["compile"] else self.wrapped
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.cfg))
        self.dtype = autocast_dtype(self.cfg["precision"], device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.console = console if ranks.main and console is not None else Console(stderr=True, quiet=not ranks.main)
        self.step = self.epoch = self.batch_in_epoch = 0
        self._clock = time.perf_counter()  # training time is now minus this, over every resume (tfkit report)
        self.best: dict[str, Any] | None = None  # the best validation record of train.keep_best so far
        self.evals_since_best = 0  # validation records since it, for train.patience
        self.window = {"loss": 0.0, "steps": 0, "items": 0}  # running sums between two log lines
        self._signal: int | None = None  # set by the handler, at any moment
        self._stop: int | None = None  # the signal all ranks stop for, agreed at the end of a step
        self._eval_seconds = 0.0  # the longest validation so far: what a budgeted run keeps in hand for its last

    # -- state ------------------------------------------------------------------------------------
    def seconds(self) -> float:
        """Wall-clock seconds of training so far, resumed runs' earlier sessions included."""
        return time.perf_counter() - self._clock

    def _rng(self) -> dict[str, Tensor]:
        rng = {"rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return rng

    def state_dict(self) -> dict[str, Any]:
        """The training state besides the weights; every rank's RNG (ranks draw different dropout
        masks), the rest is the same on all ranks. All ranks call it, as FSDP gathers the optimiser."""
        rngs = distributed.all_gather(self._rng(), self.ranks)
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "window": dict(self.window),
            "seconds": self.seconds(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **rngs[0],
            **({"rank_rngs": rngs} if self.ranks.active else {}),
        }

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def resume(self, checkpoint: Path | None) -> None:
        """Restore the state saved with the weights ``start_training`` loaded into the model; with no
        checkpoint (stopped before its first save) the run starts over from step 0."""
        if checkpoint is not None:
            self._restore(runs.load_state(checkpoint), checkpoint / runs.STATE)
        if self.ranks.main:
            runs.truncate_metrics(self.run_dir, self.step)
            self.best, self.evals_since_best = self._best_so_far(runs.read_metrics(self.run_dir))

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_optimizer_state_dict,
                )

                set_optimizer_state_dict(
                    self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
                )
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.window = dict(state["window"])
            self._clock = time.perf_counter() - state.get("seconds", 0.0)  # checkpoints before it kept no clock
            rank_rngs = state.get("rank_rngs", [])
            rng = rank_rngs[self.ranks.rank] if self.ranks.rank < len(rank_rngs) else state
            torch.set_rng_state(rng["rng"])
            if "cuda_rng" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda_rng"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # another run's state, or one edited by hand
            raise runs.damaged(
                path,
                f"does not fit this run's model and optimiser ({type(e).__name__}: {first_line(e)})",
                "was it copied from another run?",
            ) from None
        if len(rank_rngs) != self.ranks.world and (self.ranks.active or rank_rngs):
            self.console.print(
                f"[yellow]warning:[/yellow] the checkpoint was written by {max(1, len(rank_rngs))} process(es), this run has {self.ranks.world}: data order resumes exactly, dropout draws do not"
            )

    def save(self) -> None:
        """Save the checkpoint of this step (once), then remove those neither among the train.keep_last
        latest nor the best. Every rank calls it: FSDP gathers the weights and the optimiser."""
        model, state = self._whole_model(every_rank=False), self.state_dict()
        if self.ranks.main:
            runs.save_checkpoint(self.run_dir, model, state)
            runs.remove_checkpoints(self.run_dir, runs.kept_checkpoints(self.run_dir, self.recipe.config))
        distributed.barrier(self.ranks)  # nobody reads the run directory before it is whole

    def _best_so_far(self, records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, int]:
        """The best validation record of train.keep_best and how many validations came after it."""
        best = runs.best_record(records, self.recipe.config)
        later = [r for r in records if r.get("split") == "validation" and best is not None and r["step"] > best["step"]]
        return best, len(later)

    def _judge(self, metrics: dict[str, float]) -> tuple[bool, bool]:
        """After a validation: (is it the best so far, has train.patience run out), agreed by all ranks."""
        metric, verdict = self.cfg["keep_best"], (False, False, "")
        if metric and self.ranks.main:
            if metric not in metrics:
                verdict = (
                    False,
                    False,
                    f"train.keep_best '{metric}' is not a validation metric of this run (valid: {', '.join(metrics)})",
                )
            else:
                improved = self.best is None or runs.better(self.recipe.config)(metrics[metric], self.best[metric])
                self.best, self.evals_since_best = (
                    ({"step": self.step, **metrics}, 0) if improved else (self.best, self.evals_since_best + 1)
                )
                verdict = (improved, bool(self.cfg["patience"]) and self.evals_since_best >= self.cfg["patience"], "")
        improved, patience_out, problem = distributed.broadcast(verdict, self.ranks)
        if problem:
            raise UsageError(problem)
        return improved, patience_out

    def _whole_model(self, every_rank: bool) -> nn.Module | None:
        """The unsharded model: on every rank to evaluate, or on rank 0 alone (None on the others) to
        save. Under FSDP every rank must call it: it gathers the weights into a copy of the model."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # for a checkpoint only rank 0 receives the weights, in CPU memory
        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))
        if not (every_rank or self.ranks.main):
            return None
        if self._copy is None:
            with torch.random.fork_rng(devices=[]):  # building initialises weights: keep the training RNG as it is
                self._copy = self.recipe.build_model().to(self.device)
        self._copy.load_state_dict(weights)
        return self._copy

    # -- the loop ---------------------------------------------------------------------------------
    def _stream(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches across epochs, resuming mid-epoch at ``batch_in_epoch``."""
        while True:
            start = self.batch_in_epoch
            for batch in itertools.islice(self.recipe.train_batches(self.epoch), start, None):
                self.batch_in_epoch += 1
                if self.ranks.active:
                    # a rank with no rows would run a different graph, which DDP cannot reduce
                    examples = len(next(iter(batch.values())))
                    if examples < self.ranks.world:
                        self.console.print(
                            f"[yellow]warning:[/yellow] skipped a training batch of {examples} example(s), fewer than the {self.ranks.world} processes"
                        )
                        continue
                    batch = self.recipe.shard(batch, self.ranks.rank, self.ranks.world)
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if self.batch_in_epoch == 0:
                raise UsageError("the training split yields no batches (is the training data empty?)")
            self.epoch += 1
            self.batch_in_epoch = 0

    def _train_step(self, stream: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """One optimiser step; returns the mean loss and the items over all ranks."""
        self.model.train()
        accumulate, world = self.cfg["accumulate"], self.ranks.world
        # [loss, items, signal]: one all-reduce per step tells every rank all three
        totals = torch.zeros(3, dtype=torch.float64)
        for micro in range(accumulate):
            batch = next(stream)
            with distributed.gradient_sync(self.wrapped, enabled=micro == accumulate - 1):
                with self._autocast():
                    loss = self.recipe.loss(self.step_model, batch)
                # divide by the global batch's counts; DDP averages gradients over ranks, hence × world
                counts = distributed.all_reduce(torch.tensor([float(c) for _, c in loss.terms], dtype=torch.float64), self.ranks)
                value = loss.value(counts.tolist())
                self.scaler.scale(value * (world / accumulate)).backward()
            totals[0] += value.item() / accumulate
            totals[1] += loss.items
        totals[2] = self._signal or 0
        distributed.all_reduce(totals, self.ranks)
        if not math.isfinite(totals[0]):
            raise NonFiniteLoss(
                f"the loss became {totals[0].item()} at step {self.step + 1}; stopped without saving "
                f"(lower train.lr, raise train.warmup, or set train.clip_grad_norm)"
            )
        if totals[2]:  # some rank got SIGINT/SIGTERM: all save and stop after this step
            self._stop = self._signal or signal.SIGTERM
        self.scaler.unscale_(self.optimizer)
        if self.cfg["clip_grad_norm"] > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_grad_norm"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return totals[0].item(), int(totals[1])

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Metrics on ``split``: every rank evaluates its share of the batches, and rank 0 scores the
        outputs of all (the other ranks return {})."""
        start = time.perf_counter()
        model = self._whole_model(every_rank=True)
        with self._autocast(), packed_weights():
            outputs = self.recipe.eval_outputs(model, split, self.ranks.rank, self.ranks.world)
        self.model.train()
        merged = {place: output for part in distributed.all_gather(outputs, self.ranks) for place, output in part.items()}
        if not self.ranks.main:
            return {}
        metrics = self.recipe.score(split, [merged[place] for place in sorted(merged)])
        self._eval_seconds = max(self._eval_seconds, time.perf_counter() - start)
        runs.append_metrics(
            self.run_dir, {"step": self.step, "seconds": round(self.seconds(), 3), "split": split, **metrics}, durable=True
        )
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.console.print(f"step {self.step} {split}: {shown}")
        return metrics

    def plan_to_budget(self) -> None:
        """Fit ``train.steps`` and the evaluations to ``train.minutes`` (:mod:`tfkit.budget`), and
        write the plan into config.yaml, so a resumed run follows the same schedule."""
        if self.ranks.active:
            raise UsageError("train.minutes plans a run of one process; under torchrun set train.steps instead")
        self.console.print(f"timing {budget.PROBE_STEPS} steps and a validation to plan {self.cfg['minutes']:g} minutes...")
        measured = budget.probe(self.recipe, self.model, self.cfg, self.device, self._autocast)
        self._eval_seconds = measured.eval_seconds
        planned = budget.plan(self.cfg, 60 * self.cfg["minutes"] - self.seconds(), measured)
        self.cfg.update(planned)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.cfg))
        why = f"planned for train.minutes {self.cfg['minutes']:g}: {measured.step_seconds:.3f} s a step, {measured.eval_seconds:.1f} s a validation"
        runs.save_config(self.run_dir, self.recipe.config, {f"train.{key}": f"{value} ({why})" for key, value in planned.items()})
        self.console.print(
            f"train.steps = {planned['steps']:,}, train.eval_every = {planned['eval_every']:,}, "
            f"train.warmup = {planned['warmup']:,} ({why})",
            markup=False,
            highlight=False,
        )

    def _out_of_time(self) -> bool:
        """Whether a budgeted run must stop now to end on time, its last validation included."""
        return bool(self.cfg["minutes"]) and self.seconds() + self._eval_seconds > 60 * self.cfg["minutes"]

    def _say_how_long(self, step_seconds: float) -> None:
        """Once, early in a long run without a budget: how long it will take, and how to ask for less."""
        left = (self.cfg["steps"] - self.step) * step_seconds
        if not self.cfg["minutes"] and left > budget.LONG_RUN:
            self.console.print(
                f"train.steps {self.cfg['steps']:,} at {step_seconds:.3g} s a step: about {budget.spoken(left)} "
                f"to go (--time 20m plans a run that fits 20 minutes; --max-steps N stops sooner)",
                markup=False,
                highlight=False,
            )

    def fit(self, on_step: Callable[[int], None] | None = None, progress: bool = True) -> dict[str, float]:
        """Train to ``train.steps``, or for ``train.minutes``; ``on_step`` is called after each step
        (tests use it to interrupt)."""
        if self.cfg["minutes"] and self.step == 0:
            self.plan_to_budget()
        cfg, total = self.cfg, self.cfg["steps"]
        told_how_long = self.step > 0
        stream = self._stream()
        metrics: dict[str, float] = {}
        last_eval = -1
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        ]
        progress = progress and self.ranks.main
        with self._signals(), Progress(*columns, console=self.console, disable=not progress) as bar:
            task = bar.add_task(self.recipe.config["recipe"], total=total, completed=self.step, info="")
            tick = time.perf_counter()
            while self.step < total:
                loss, items = self._train_step(stream)
                self.window["loss"] += loss
                self.window["steps"] += 1
                self.window["items"] += items
                if self.step % cfg["log_every"] == 0 or self.step == total:
                    elapsed = time.perf_counter() - tick
                    record = {
                        "step": self.step,
                        "loss": self.window["loss"] / self.window["steps"],
                        "lr": self.scheduler.get_last_lr()[0],
                        "items_per_s": self.window["items"] / max(elapsed, 1e-9),
                        "seconds": round(self.seconds(), 3),
                    }
                    if self.ranks.main:
                        runs.append_metrics(self.run_dir, record)
                    info = f"loss {record['loss']:.3f}  lr {record['lr']:.2e}  {record['items_per_s']:,.0f} {self.recipe.unit}/s"
                    bar.update(task, info=info)
                    if progress and not self.console.is_terminal:  # logs and CI: a line instead of a bar
                        self.console.print(f"step {self.step}/{total}  {info}")
                    if not told_how_long and self.ranks.main:
                        self._say_how_long(elapsed / self.window["steps"])
                        told_how_long = True
                    self.window = {"loss": 0.0, "steps": 0, "items": 0}
                    tick = time.perf_counter()
                bar.update(task, completed=self.step)
                improved = patience_out = False
                if cfg["eval_every"] and self.step % cfg["eval_every"] == 0:
                    metrics, last_eval = self.evaluate(), self.step
                    improved, patience_out = self._judge(metrics)
                if improved or patience_out or self.step % cfg["save_every"] == 0:
                    self.save()
                out_of_time = self._out_of_time()
                if on_step is not None:
                    on_step(self.step)
                # under torchrun only the flag agreed in the step's all-reduce counts: a signal landing
                # after it would make its rank alone stop while the others start the next collectives
                stop = self._stop if self.ranks.active else self._signal
                if stop is not None:
                    self.save()
                    raise Interrupted(stop, self.run_dir, self.step)
                if out_of_time and self.step < total:
                    self.console.print(
                        f"time budget of {cfg['minutes']:g} minutes reached at step {self.step} of {total}: "
                        f"stopping for the last validation"
                    )
                    break
                if patience_out:
                    best = self.best or {}
                    self.console.print(
                        f"early stop at step {self.step}: no better validation {cfg['keep_best']} in "
                        f"{cfg['patience']} evaluations (best {best.get(cfg['keep_best'], 0):.4g} at step {best.get('step')})"
                    )
                    break
        self.save()
        if last_eval != self.step:
            metrics = self.evaluate()
            self._judge(metrics)
            self.save()  # the checkpoint is there: only which ones are kept may change
        return metrics

    @contextmanager
    def _signals(self):
        """SIGINT and SIGTERM finish the current step, save, and stop."""

        def handler(signum, frame):
            self._signal = signum

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        for s in previous:
            # restart interrupted system calls: a signal arriving inside a gloo collective must not
            # break the socket read of the step that is about to be saved
            signal.siginterrupt(s, False)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def start_training(
    config: dict[str, Any],
    run_dir: Path | None,
    device: torch.device,
    resume: bool = False,
    console: Console | None = None,
    ranks: Ranks = Ranks(),
) -> Trainer:
    """A trainer for a resolved config: new run directory (``run_dir`` or runs/RECIPE/TIME), or with
    ``resume`` the existing ``run_dir`` restored to its last checkpoint."""
    console = console or Console(stderr=True)
    check_best_options(config["train"])
    recipe = registry.get("recipe", config["recipe"])(config)
    recipe.check()
    # rank 0 prepares the data (filling the cache) and fits the tokenizer; the other ranks then load
    # that tokenizer from the run directory, as a resumed run does, so all ranks encode alike
    if ranks.main:
        console.print(f"preparing data for [bold]{config['recipe']}[/bold]...")
        recipe.prepare(run_dir if resume else None)
        for key, why in recipe.chosen.items():
            console.print(f"{key} = {why}", markup=False, highlight=False)
        if not resume:
            run_dir = runs.new_run_dir(config["recipe"], run_dir)
            recipe.save(run_dir)
        runs.save_config(run_dir, config, None if resume else recipe.chosen)
    run_dir = distributed.broadcast(run_dir, ranks)
    if not ranks.main:  # with the sizes rank 0 chose from the data
        config = runs.read_config(run_dir)
        recipe = registry.get("recipe", config["recipe"])(config)
        recipe.prepare(run_dir)
    torch.manual_seed(config["seed"])
    model = recipe.build_model()
    checkpoint = runs.last_checkpoint(run_dir) if resume else None
    if checkpoint is not None:  # before DDP or FSDP wrap the model
        runs.load_weights(model, checkpoint / runs.WEIGHTS)
    elif config.get("init"):
        recipe.load_pretrained(model, Path(config["init"]))
    trainer = Trainer(recipe, model, run_dir, device, console, ranks)
    if resume:
        trainer.resume(checkpoint)
    return trainer
