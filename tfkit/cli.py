"""The tfkit command line: train, predict, evaluate, inspect-attention, recipes, components."""

from __future__ import annotations

import gc
import inspect as pyinspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from tfkit import config as configs
from tfkit import errors, registry
from tfkit import run as runs
from tfkit.errors import TfkitError, UsageError
from tfkit.recipe import Recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, run and explain the Transformer family.\n\nExample: tfkit train translation",
)
stdout = Console()
stderr = Console(stderr=True)


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """Train, run and explain the Transformer family."""


def _recipe_class(name: str) -> Any:
    registry.load_all()
    return registry.get("recipe", name)


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe name (see tfkit recipes); omit with --resume."),
    preset: str = typer.Option(
        "tiny", "--preset", help="Model sizes: tiny (the built-in data's), small, base (see tfkit recipes)."
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of overrides to the recipe's config."),
    set_: list[str] = typer.Option([], "--set", help="Override one config key: --set model.d_model=256 (repeatable)."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Data: a .tsv/.csv/.jsonl file, a folder, or a Hugging Face dataset name."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/RECIPE/TIME)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Train for this many optimiser steps."),
    time_: Optional[str] = typer.Option(
        None, "--time", help="Train for this long (20m, 1h30m): steps and evaluations planned to fit."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for data order, splits and initialisation."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory exactly."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from published weights (a Hugging Face model folder)."),
    compile_: bool = typer.Option(False, "--compile", help="Compile the training step with torch.compile (train.compile=true)."),
) -> None:
    """Train a recipe and write a run directory.

    Example: tfkit train translation --set train.steps=500 --out runs/demo
    """
    from tfkit import distributed
    from tfkit.budget import parse_duration
    from tfkit.train import pick_device, start_training

    target = pick_device(device)
    ranks = distributed.from_environment()
    sets = list(set_)
    sets += [f"data.name={data}"] if data is not None else []
    sets += [f"train.steps={max_steps}"] if max_steps is not None else []
    sets += [f"train.minutes={parse_duration(time_)}"] if time_ is not None else []
    sets += [f"seed={seed}"] if seed is not None else []
    sets += ["train.compile=true"] if compile_ else []
    if resume is not None:
        if config or set_ or data or seed is not None or out or init or preset != "tiny" or time_ is not None:
            raise UsageError("--resume continues a run with its own config (only --max-steps, --device and --compile apply)")
        registry.load_all()
        resolved = runs.read_config(resume)
        if recipe is not None and recipe != resolved["recipe"]:
            raise UsageError(f"{resume} is a {resolved['recipe']} run, not {recipe}")
        resolved = configs.resolve(resolved, None, sets)
        run_dir = resume
    else:
        if recipe is None:
            raise UsageError("name a recipe to train (see tfkit recipes), or pass --resume RUN")
        recipe_cls = _recipe_class(recipe)
        defaults = recipe_cls.default_config(preset)
        if init is not None:  # the pretrained model fixes its sizes; the user's config and --set come after
            defaults = configs.merge(defaults, {**recipe_cls.pretrained_config(init), "init": str(init)})
        resolved = configs.resolve(defaults, config, sets)
        if resolved["preset"] != preset:
            raise UsageError(
                f"choose a preset with --preset {resolved['preset']}, not as a config key (it sets many keys at once)"
            )
        if out is not None and (out / runs.CONFIG).exists():
            raise UsageError(f"{out} already holds a run (continue it with --resume {out}, or pick another --out)")
        run_dir = out

    with distributed.process_group(ranks, target, resolved["train"]["timeout"]) as target:
        console = stderr if ranks.main else Console(stderr=True, quiet=True)
        trainer = start_training(resolved, run_dir, target, resume=resume is not None, console=console, ranks=ranks)
        parameters = sum(p.numel() for p in trainer.model.parameters())
        processes = f", {ranks.world} processes, {resolved['train']['strategy']}" if ranks.active else ""
        console.print(f"run directory {trainer.run_dir}  ({parameters:,} parameters, {target}{processes})")
        metrics = trainer.fit()
        console.print("done: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        run_dir = trainer.run_dir
        # DDP and FSDP modules hold the process group: free them while it exists, so the group is
        # torn down here and not at interpreter exit, where gloo's threads can abort the process
        del trainer
        gc.collect()
    if ranks.main:
        if registry.get("recipe", resolved["recipe"]).baselines is not Recipe.baselines:  # peers belong with the result
            recipe, model = runs.open_run(run_dir, pick_device(device))  # the best checkpoint, as evaluate scores it
            recipe.prepare(run_dir)
            peers = recipe.baselines("test")  # kept in the run directory, as evaluate keeps them
            stderr.print(
                _comparison(f"{run_dir} (test)", {"this run": recipe.evaluate(model, "test"), **peers}, recipe.reference)
            )
        print(run_dir)


def _options(method: Any, **given: Any) -> dict[str, Any]:
    """Pass on the options the user gave, each in its config key's range (``beam`` as ``decode.beam``);
    one the recipe does not take is a usage error."""
    accepted = pyinspect.signature(method).parameters
    chosen = {k: v for k, v in given.items() if v is not None}
    for name, value in chosen.items():
        flag = f"--{name.replace('_', '-')}"
        if name not in accepted:
            raise UsageError(f"{flag} does not apply to this recipe")
        words, test = {**configs.RANGES, **method.__self__.ranges}[name]  # a bound method of the run's recipe
        if not test(value):
            raise UsageError(f"{flag} must be {words}, got {value}")
    return chosen


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory written by tfkit train."),
    files: list[Path] = typer.Argument(..., help="Input files."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write predictions here instead of stdout."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size for sequence outputs (1 = greedy)."),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", help="How many labels to list per input (classifiers); sample from the k likeliest tokens (causal-lm)."
    ),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature, 0 = greedy (causal-lm)."),
    top_p: Optional[float] = typer.Option(
        None, "--top-p", help="Sample from the likeliest tokens that reach this probability (causal-lm)."
    ),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens to generate per prompt (causal-lm)."),
    repetition_penalty: Optional[float] = typer.Option(
        None, "--repetition-penalty", help="Above 1: tokens already in the text are less likely (CTRL; causal-lm)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed: the same seed gives the same text (causal-lm)."),
    checkpoint: str = typer.Option(
        "auto", "--checkpoint", help="best, last, or auto: the best where train.keep_best kept one, else the last."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Predict on input files (or folders of images); a bad file is reported and the rest are still processed.

    Example: tfkit predict runs/translation/20261123-101500 sentences.txt --beam 4
    """
    from tfkit.nn.linear import packed_weights
    from tfkit.train import pick_device

    registry.load_all()
    recipe, model = runs.open_run(run_dir, pick_device(device), checkpoint)
    options = _options(
        recipe.predict_file,
        beam=beam,
        top_k=top_k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        repetition_penalty=repetition_penalty,
    )
    failed = 0
    try:
        sink = open(out, "w", encoding="utf-8") if out else sys.stdout
    except OSError as e:
        raise UsageError(f"cannot write --out {out} ({e.strerror})") from None
    with packed_weights():
        try:
            header = recipe.predict_header()
            if header is not None:
                sink.write(header + "\n")
            for path in files:
                try:
                    recipe.predict_file(model, path, sink, **options)
                except Exception as e:  # one bad file must not cost the others
                    failed += 1
                    errors.report_bad_input(path, e)
        finally:
            if out:
                sink.close()
    if failed:
        raise typer.Exit(2)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory written by tfkit train."),
    split: str = typer.Option("test", "--split", help="test or validation."),
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="Score on this data instead, in any of the recipe's training formats: all of a file, or the --split of a source that has splits.",
    ),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size for sequence outputs (1 = greedy)."),
    stride: Optional[int] = typer.Option(
        None,
        "--stride",
        help="Sliding-window perplexity: windows of data.block_size tokens this many apart, only the new ones scored (causal-lm).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    checkpoint: str = typer.Option(
        "auto", "--checkpoint", help="best, last, or auto: the best where train.keep_best kept one, else the last."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Score a trained run on its held-out split, or on other data (--data).

    Example: tfkit evaluate runs/translation/20261123-101500 --json
    """
    from contextlib import nullcontext

    from tfkit.data import evaluation_data
    from tfkit.nn.linear import packed_weights
    from tfkit.train import pick_device

    if split not in ("test", "validation"):
        raise UsageError(f"unknown split '{split}' (valid: test, validation)")
    registry.load_all()
    recipe, model = runs.open_run(run_dir, pick_device(device), checkpoint)
    if data is not None:
        recipe.config["data"]["name"] = data
    with evaluation_data(split) if data is not None else nullcontext():
        recipe.prepare(run_dir)
    with packed_weights():
        metrics = recipe.evaluate(model, split, **_options(recipe.eval_outputs, beam=beam, stride=stride))
    peers = recipe.baselines(split)
    if as_json:
        print(json.dumps({**metrics, "baselines": peers} if peers else metrics))
        return
    if peers:
        stdout.print(_comparison(f"{run_dir} ({split})", {"this run": metrics, **peers}, recipe.reference))
        return
    table = Table(title=f"{run_dir} ({split})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.2f}")
    stdout.print(table)


def _comparison(title: str, rows: dict[str, dict[str, float]], reference: str | None) -> Table:
    """One row per model, one column per metric, each value with its change against ``reference``."""
    table = Table(title=title + (f"; in brackets, the change against {reference}" if reference else ""))
    metrics = list(next(iter(rows.values())))
    table.add_column("model")
    for metric in metrics:
        table.add_column(metric, justify="right")
    base = rows.get(reference) if reference else None
    for name, values in rows.items():
        cells = []
        for metric in metrics:
            cell = f"{values[metric]:.3f}"
            if base is not None and name != reference and base[metric]:
                cell += f" ({100 * (values[metric] - base[metric]) / abs(base[metric]):+.1f}%)"
            cells.append(cell)
        table.add_row(name, *cells)
    return table


@app.command("export")
def export_(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory written by tfkit train."),
    out: Path = typer.Argument(..., metavar="OUT", help="The folder to write (new or empty)."),
    to: str = typer.Option(
        ...,
        "--to",
        help="hf: a folder transformers' Auto classes load; onnx: the inference graph(s) and their pre- and post-processing.",
    ),
    checkpoint: str = typer.Option(
        "auto", "--checkpoint", help="best, last, or auto: the best where train.keep_best kept one, else the last."
    ),
) -> None:
    """Write a trained run as a transformers model folder (--to hf) or as ONNX (--to onnx).

    Example: tfkit export runs/bert-finetune/20261123-101500 my-classifier --to hf
    """
    from tfkit.export import export

    registry.load_all()
    stderr.print(export(run_dir, out, to, checkpoint))


@app.command("inspect-attention")
def inspect_attention(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory written by tfkit train."),
    text: str = typer.Argument(..., metavar="INPUT", help="The input to look at (text, or a file for image and speech recipes)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default RUN/attention/INPUT)."),
    checkpoint: str = typer.Option(
        "auto", "--checkpoint", help="best, last, or auto: the best where train.keep_best kept one, else the last."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Dump every attention head for one input: attention.npz, tokens.json, PNG heatmaps and report.html.

    Example: tfkit inspect-attention runs/translation/20261123-101500 "twenty-five"
    """
    from tfkit.inspect import head_summary, head_type_cell, inspect, write_head_types
    from tfkit.page import CAP, write_report
    from tfkit.train import pick_device

    registry.load_all()
    recipe, model = runs.open_run(run_dir, pick_device(device), checkpoint)
    example = recipe.attention_example(model, text)
    folder = out or run_dir / "attention" / (re.sub(r"[^\w.-]+", "_", text).strip("_")[:60] or "input")
    weights = inspect(model, example, folder)
    for name, w in weights.items():
        query_axis, key_axis = example.axes(name)
        table = Table(title=f"{name}  ({query_axis} → {key_axis})")
        for column in ("head", "entropy (nats)", "most attended", "weight"):
            table.add_column(column)
        for head, entropy, token, weight in head_summary(w, example.tokens[key_axis]):
            table.add_row(str(head), f"{entropy:.2f}", token, f"{weight:.2f}")
        stdout.print(table)
    scores = write_head_types(example, folder)
    if scores:
        kinds = list(dict.fromkeys(kind for per_module in scores.values() for kind in per_module))
        table = Table(title=example.head_types_title)
        for column in ("module", "head", *kinds):
            table.add_column(column)
        for name, per_module in scores.items():
            for head in range(len(per_module[kinds[0]])):
                table.add_row(
                    name, str(head), *(head_type_cell(per_module, kind, head, example.head_type_marks) for kind in kinds)
                )
        stdout.print(table)
    left_out = write_report(folder / "report.html", f"{recipe.config['recipe']}: {text}", example, weights, scores)
    if left_out:
        stderr.print(
            f"note: report.html holds at most {CAP:,} weights; the matrices of {len(left_out)} modules (from {left_out[0]} on) are in attention.npz only"
        )
    stderr.print(
        f"wrote {folder}/attention.npz, tokens.json, {len(list(folder.glob('*.png')))} PNG files, report.html"
        + (" and head_types.json" if scores else "")
    )


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN...", help="One or more run directories written by tfkit train."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default RUN/report for one run, ./report for several)."
    ),
) -> None:
    """Draw what training did: every logged quantity against step and time, one line per run, the last
    figures and the config keys that differ, as report.html and PNGs.

    Example: tfkit report runs/translation/20261123-101500 runs/translation/20261124-090000
    """
    from tfkit.report import write_report

    registry.load_all()
    target = out or (run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report"))
    stderr.print(f"wrote {write_report(run_dirs, target)}")


@app.command()
def recipes() -> None:
    """List the recipes.

    Example: tfkit recipes
    """
    registry.load_all()
    table = Table(title="recipes")
    table.add_column("recipe")
    table.add_column("description")
    table.add_column("presets: parameters on the built-in data (tfkit train RECIPE --preset NAME)")
    for name in registry.names("recipe"):
        recipe_cls = registry.get("recipe", name)
        sizes = [f"{preset} {_millions(recipe_cls, preset)}" for preset in recipe_cls.presets()]
        table.add_row(name, registry.summary(recipe_cls), " · ".join(sizes))
    stdout.print(table)


def _millions(recipe_cls: Any, preset: str) -> str:
    count = recipe_cls.preset_parameters(preset)
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.0f}k"


@app.command()
def components() -> None:
    """List the component registry: kind, name, summary.

    Example: tfkit components
    """
    registry.load_all()
    table = Table(title="components")
    for column in ("kind", "name", "summary"):
        table.add_column(column)
    for kind in registry.kinds():
        if kind == "recipe":
            continue
        for name in registry.names(kind):
            table.add_row(kind, name, registry.summary(registry.get(kind, name)))
    stdout.print(table)


def main(argv: list[str] | None = None) -> None:
    # read before Typer parses: errors are turned into one line here, outside the app
    argv = sys.argv[1:] if argv is None else argv
    debug = errors.debug = "--debug" in argv
    try:
        # --debug may come anywhere (tfkit train x --debug), not only before the command as Typer wants
        app(args=[arg for arg in argv if arg != "--debug"], prog_name="tfkit")
    except TfkitError as e:
        if debug:
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not e.every_rank:  # under torchrun, one line for what every rank hit alike
            print(f"error: {'' if rank == '0' else f'rank {rank}: '}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or an environment failure: one line unless --debug
        if debug:
            raise
        if "RANK" in os.environ:
            from tfkit import distributed

            if distributed.lost_rank(e):
                print(f"error: rank {os.environ['RANK']}: {distributed.LostRank(e)}", file=sys.stderr)
                sys.exit(1)
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
