"""Is the data pipeline ever the bottleneck, and how much padding does length bucketing save?

    python benchmarks/pipeline.py [--steps N] [--windows N] [--recipes translation vit bert-pretrain conformer]
    python benchmarks/pipeline.py --augmentations [--batches N]

For each recipe (default config, built-in data, CPU): the same training steps are timed drawing
batches from the recipe's own loader (``Trainer._stream``, as ``tfkit train`` does) and from the
same batches built beforehand in memory, in alternating windows of a few steps; the ratio is the
loader's steps/s over the in-memory steps/s, each from its median window (1.00 = the loader costs
nothing). For sequence recipes it also reports the padding fraction of one epoch's batches as the
recipe builds them (length-bucketed) and of the same sequences grouped at random.

``--augmentations`` times the conformer's speech augmentations instead: on the same built-in training
batches, each augmentation alone at rate 1 (the others off), then the default config's mix, in
milliseconds per batch beside one training step of the default model.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table

from tfkit import registry
from tfkit.data import length_buckets
from tfkit.recipe import Batch
from tfkit.train import Trainer

Lengths = Callable[[dict[str, torch.Tensor]], list[tuple[torch.Tensor, int]]]


def token_rows(*keys: str) -> Lengths:
    """Padded (B, T) token inputs, pad id 0 → per input: the real lengths and the padded width."""
    return lambda batch: [((batch[key] != 0).sum(1), batch[key].size(1)) for key in keys]


PADDED: dict[str, Lengths] = {
    "translation": token_rows("src", "tgt_in"),
    "bert-pretrain": token_rows("token_ids"),
    "conformer": lambda batch: [(batch["lengths"], batch["features"].size(1))],
}


def steps_per_second(trainer: Trainer, streams: dict[str, Iterator[Batch]], windows: int, steps: int) -> dict[str, float]:
    """Steps/s of each stream, timed in ``windows`` windows of ``steps`` training steps each, the
    streams' windows alternating (and which goes first swapping) so that warm-up and the machine's
    drift slow all alike; median window per stream."""
    times: dict[str, list[float]] = {name: [] for name in streams}
    for name, stream in streams.items():
        trainer._train_step(stream)  # warm-up
    for window in range(windows):
        for name in list(streams) if window % 2 == 0 else reversed(list(streams)):
            start = time.perf_counter()
            for _ in range(steps):
                trainer._train_step(streams[name])
            times[name].append(time.perf_counter() - start)
    return {name: steps / statistics.median(t) for name, t in times.items()}


def padding(batches: list[dict[str, torch.Tensor]], lengths_of: Lengths, seed: int = 0) -> tuple[float, float]:
    """(bucketed, random) padding fractions over the given batches' padded inputs."""
    streams: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))  # per input: lengths, batch sizes
    bucketed = total = 0
    for batch in batches:
        for i, (lengths, width) in enumerate(lengths_of(batch)):
            streams[i][0].extend(lengths.tolist())
            streams[i][1].append(len(lengths))
            bucketed += width * len(lengths) - int(lengths.sum())
            total += width * len(lengths)
    random_pad = random_total = 0
    for lengths, sizes in streams.values():
        random.Random(seed).shuffle(lengths)
        start = 0
        for size in sizes:
            group = lengths[start : start + size]
            start += size
            random_total += max(group) * len(group)
            random_pad += max(group) * len(group) - sum(group)
    return bucketed / total, random_pad / random_total


def augmentation_costs(batches: int) -> None:
    """Milliseconds per training batch of each speech augmentation, over the same ``batches`` batches."""
    from tfkit.recipes.conformer.augment import augment

    recipe = registry.get("recipe", "conformer")(registry.get("recipe", "conformer").default_config())
    recipe.prepare()
    rate, defaults = recipe.config["data"]["sample_rate"], recipe.config["augment"]
    log_mel = recipe._log_mel()
    order = length_buckets(recipe.train_frames, recipe.config["train"]["batch_size"], torch.Generator().manual_seed(0), pool=50)
    audio = [recipe._train_samples(rows) for rows in order[:batches]]
    off = {name: {**settings, "rate": 0.0} for name, settings in defaults.items()}
    mixes = {
        "none (features only)": off,
        **{name: {**off, name: {**defaults[name], "rate": 1.0}} for name in defaults},
        "default mix": defaults,
    }

    def per_batch(cfg: dict) -> float:
        draws = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for batch in audio:
            for i, samples in enumerate(batch):
                log_mel(*augment(samples, cfg, rate, draws, batch[:i] + batch[i + 1 :]))
        return 1000 * (time.perf_counter() - start) / len(audio)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        trainer = Trainer(recipe, recipe.build_model(), Path(tmp), torch.device("cpu"), Console(quiet=True))
        prebuilt = list(itertools.islice(trainer._stream(), 11))
        stream = iter(prebuilt)
        trainer._train_step(stream)
        start = time.perf_counter()
        for _ in range(10):
            trainer._train_step(stream)
        step_ms = 100 * (time.perf_counter() - start)
    table = Table(
        title=f"speech augmentation, ms per batch of {recipe.config['train']['batch_size']} (built-in speech, CPU, {torch.get_num_threads()} threads)"
    )
    for column in ("augmentation", "ms / batch", "beside a training step"):
        table.add_column(column, justify="left" if column == "augmentation" else "right")
    base = per_batch(off)
    for name, cfg in mixes.items():
        cost = base if cfg is off else per_batch(cfg)
        extra = cost if cfg is off else cost - base
        table.add_row(name, f"{cost:.1f}" + ("" if cfg is off else f" (+{extra:.1f})"), f"{100 * extra / step_ms:.1f}%")
    table.add_row("one training step", f"{step_ms:.0f}", "")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    parser.add_argument("--windows", type=int, default=15, help="timed windows of each, alternating")
    parser.add_argument("--recipes", nargs="+", default=["translation", "vit", "bert-pretrain", "conformer"])
    parser.add_argument("--augmentations", action="store_true", help="time the conformer's speech augmentations instead")
    parser.add_argument("--batches", type=int, default=20, help="with --augmentations: batches timed")
    args = parser.parse_args()
    registry.load_all()
    if args.augmentations:
        augmentation_costs(args.batches)
        return
    console = Console()
    table = Table(title="data pipeline (default configs, CPU)")
    for column in ("recipe", "loader steps/s", "in-memory steps/s", "ratio", "padding bucketed", "padding random"):
        table.add_column(column, justify="right" if column != "recipe" else "left")
    for name in args.recipes:
        recipe = registry.get("recipe", name)(registry.get("recipe", name).default_config())
        recipe.prepare()
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(recipe, recipe.build_model(), Path(tmp), torch.device("cpu"), Console(quiet=True))
            # both streams yield the same batches in the same order, so their windows do the same work
            prebuilt = list(itertools.islice(trainer._stream(), 1 + args.windows * args.steps))
            trainer.epoch = trainer.batch_in_epoch = 0
            rates = steps_per_second(trainer, {"loader": trainer._stream(), "memory": iter(prebuilt)}, args.windows, args.steps)
            loader_rate, memory_rate = rates["loader"], rates["memory"]
        pads = ("", "")
        if name in PADDED:
            epoch = list(recipe.train_batches(0))
            pads = tuple(f"{100 * p:.1f}%" for p in padding(epoch, PADDED[name]))
        table.add_row(name, f"{loader_rate:.2f}", f"{memory_rate:.2f}", f"{loader_rate / memory_rate:.2f}", *pads)
    console.print(table)


if __name__ == "__main__":
    main()
