"""The run directory: everything predict, evaluate, inspect-attention and resume need.

    config.yaml            the resolved config
    tokenizer.json         or labels.json: what the recipe saves
    metrics.jsonl          one JSON object per log or evaluation step
    checkpoints/
      step-00001200/       one whole checkpoint:
        model.safetensors    the weights (their metadata holds the step)
        state.pt             optimiser, scheduler, RNG and data position (torch.load(weights_only=True))

A checkpoint is written into a hidden folder (``checkpoints/.step-00001200.tmp``), each file and the
folder are flushed to disk (fsync), and only then is the folder renamed to its name and the parent
flushed: a kill or a power cut at any instant leaves every ``step-*`` folder whole, and the latest one
is the highest step. Older checkpoints are removed only after the new one is in place. The other files
are replaced the same way (a temporary file, fsync, rename, fsync of the folder); metrics.jsonl is
flushed before each checkpoint, so it always holds the records up to the latest one.

The best checkpoint (``train.keep_best``) is the one with the best validation record in metrics.jsonl
among those kept: no pointer file can disagree with the checkpoints.

A damaged file is reported in one line that names it: ``RUN/FILE: what is wrong (what to do)``.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_model
from tokenizers import Tokenizer
from torch import nn

from tfkit import config as configs
from tfkit import registry
from tfkit.errors import TfkitError, UsageError, first_line

if TYPE_CHECKING:
    from tfkit.recipe import Recipe

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
METRICS = "metrics.jsonl"
TOKENIZER = "tokenizer.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_CHOICES = ("auto", "best", "last")  # --checkpoint; auto: best where kept, else last


# -- durable writes ---------------------------------------------------------------------------------
def fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries, to the disk."""
    if path.is_dir() and os.name != "posix":
        return  # only POSIX can open a folder to flush its entries
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file, flush it, rename it over ``path`` and flush the folder: after a crash
    or power cut ``path`` holds the old contents or the new, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def new_run_dir(recipe: str, out: Path | None) -> Path:
    if out is None:
        out = Path("runs") / recipe / time.strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while out.exists():
            out = out.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
            suffix += 1
    make_dir(out)
    return out


def make_dir(path: Path) -> None:
    """Create ``path`` and its parents; one that cannot be made (read-only, a file there) is a usage error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder {path} ({e.strerror}; pick another --out)") from None


def require(run_dir: Path, *names: str) -> None:
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} does not exist (pass the directory tfkit train printed)")
    for name in names:
        if not (run_dir / name).is_file():
            raise UsageError(f"run directory {run_dir} has no {name} (is it a complete tfkit run?)")


def damaged(path: Path, error: BaseException | str, todo: str) -> UsageError:
    """The one-line error for a file of a run that cannot be used: what is wrong, then what to do."""
    what = error if isinstance(error, str) else f"{type(error).__name__}: {first_line(error)}"
    return UsageError(f"{path}: {what} ({todo})")


# -- the config -------------------------------------------------------------------------------------
def save_config(run_dir: Path, config: dict[str, Any], chosen: dict[str, str] | None = None) -> None:
    """Write config.yaml. The keys chosen from the data or for a time budget (``chosen``, key → why)
    head it as comments, added to those already there (``None``: keep them as they are)."""
    path = run_dir / CONFIG
    old = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = dict(
        re.match(r"#   ([^:]+): (.*)", line).groups()
        for line in itertools.takewhile(lambda line: line.startswith("#"), old)
        if re.match(r"#   ([^:]+): (.*)", line)
    )
    notes = {**kept, **(chosen or {})}
    header = "".join(["# chosen from the data:\n", *(f"#   {key}: {why}\n" for key, why in notes.items())]) if notes else ""
    atomic_write(path, lambda p: p.write_text(header + configs.dump(config), encoding="utf-8"))


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as written, checked against its recipe's schema and ranges."""
    require(run_dir, CONFIG)
    path = run_dir / CONFIG
    todo = "fix it, or restore the file from a copy of the run"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise damaged(path, f"not valid YAML{where} ({getattr(e, 'problem', None) or 'syntax error'})", todo) from None
    except (OSError, UnicodeDecodeError) as e:
        raise damaged(path, e, todo) from None
    if not isinstance(config, dict):
        raise damaged(path, "does not hold a mapping of config keys", todo)
    try:
        recipe_cls = registry.get("recipe", str(config.get("recipe")))
        return configs.resolve(configs.merge(recipe_cls.default_config(), config))
    except UsageError as e:
        raise damaged(path, str(e), todo) from None


# -- checkpoints ------------------------------------------------------------------------------------
def checkpoints(run_dir: Path) -> list[Path]:
    """The run's whole checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write the checkpoint of ``state["step"]`` whole (see the module's docstring) and return its
    folder; one of that step already there is kept as it is. A save that fails (a full disk) removes
    what it wrote and leaves the previous checkpoints as they were."""
    step = state["step"]
    folder = run_dir / CHECKPOINTS
    target = folder / f"step-{step:08d}"
    if (run_dir / METRICS).exists():
        fsync(run_dir / METRICS)  # the records up to this checkpoint survive a power cut with it
    if target.is_dir():
        return target
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{target.name}.tmp"
    needed = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *tensors_in(state)])
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        if shutil.disk_usage(folder).free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS), metadata={"step": str(step)})
        torch.save(state, tmp / STATE)
        for path in (tmp / WEIGHTS, tmp / STATE, tmp):
            fsync(path)
        os.rename(tmp, target)
        fsync(folder)
    except Exception as e:  # torch and safetensors report a full disk as their own errors
        shutil.rmtree(tmp, ignore_errors=True)
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or shutil.disk_usage(folder).free < needed
        reason = os.strerror(errno.ENOSPC) if full else (getattr(e, "strerror", None) or first_line(e))
        previous = checkpoints(run_dir)
        kept = (
            f"the checkpoint of step {checkpoint_step(previous[-1])} is whole" if previous else "no checkpoint was saved before"
        )
        raise TfkitError(
            f"{run_dir}: could not save the checkpoint of step {step} ({reason}); {kept} "
            f"(free some space, then continue with: tfkit train --resume {run_dir})"
        ) from None
    return target


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a nested state (dicts and lists of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in tensors_in(item)] if isinstance(value, (list, tuple)) else []


def remove_checkpoints(run_dir: Path, keep: set[Path]) -> None:
    """Remove every checkpoint but ``keep``, and what killed saves and removals left. Each is renamed
    out of the ``step-*`` names first, so that a kill halfway through removing one never leaves a
    partial checkpoint under a checkpoint's name. Call it between saves, never during one."""
    folder = run_dir / CHECKPOINTS
    for checkpoint in checkpoints(run_dir):
        if checkpoint not in keep:
            trash = folder / f".{checkpoint.name}.removed"
            os.rename(checkpoint, trash)
            shutil.rmtree(trash)
    for leftover in folder.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def better(config: dict[str, Any]) -> Callable[[float, float], bool]:
    """Whether a value of ``train.keep_best`` beats another: ``train.best_mode`` max or min; auto
    picks min for losses and the metrics the recipe declares minimised, max for the rest."""
    metric, mode = config["train"]["keep_best"], config["train"]["best_mode"]
    if mode == "auto":
        lower = ("loss", *registry.get("recipe", config["recipe"]).minimised)
        mode = "min" if any(metric.endswith(word) for word in lower) else "max"
    return (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)


def best_record(records: list[dict[str, Any]], config: dict[str, Any], steps: set[int] | None = None) -> dict[str, Any] | None:
    """The first validation record with the best ``train.keep_best`` value (among ``steps`` if given)."""
    metric, best = config["train"]["keep_best"], None
    if not metric:
        return None
    beats = better(config)
    for record in records:
        value = record.get(metric)
        if record.get("split") == "validation" and isinstance(value, (int, float)) and (steps is None or record["step"] in steps):
            if best is None or beats(value, best[metric]):
                best = record
    return best


def best_checkpoint(run_dir: Path, config: dict[str, Any]) -> Path | None:
    """The kept checkpoint with the best validation ``train.keep_best``; None when none is kept."""
    if not config["train"]["keep_best"]:
        return None
    kept = {checkpoint_step(c): c for c in checkpoints(run_dir)}
    record = best_record(read_metrics(run_dir), config, set(kept))
    return kept[record["step"]] if record else None


def kept_checkpoints(run_dir: Path, config: dict[str, Any]) -> set[Path]:
    """The ``train.keep_last`` latest checkpoints and the best one."""
    kept = set(checkpoints(run_dir)[-config["train"]["keep_last"] :])
    best = best_checkpoint(run_dir, config)
    return kept | {best} if best else kept


def pick_checkpoint(run_dir: Path, config: dict[str, Any], which: str = "auto") -> Path:
    """The checkpoint ``--checkpoint`` names: ``last``, ``best`` (train.keep_best), or ``auto``, the
    best where the run keeps one, else the last."""
    if which not in CHECKPOINT_CHOICES:
        raise UsageError(f"unknown --checkpoint '{which}' (valid: {', '.join(CHECKPOINT_CHOICES)})")
    found = checkpoints(run_dir)
    if not found:
        raise UsageError(
            f"run directory {run_dir} has no checkpoint yet (it was stopped before its first save: "
            f"continue it with tfkit train --resume {run_dir})"
        )
    if which == "last":
        return found[-1]
    best = best_checkpoint(run_dir, config)
    if which == "best" and best is None:
        why = (
            "it was trained without train.keep_best"
            if not config["train"]["keep_best"]
            else "none of its checkpoints was evaluated yet"
        )
        raise UsageError(f"{run_dir} has no best checkpoint ({why}; use --checkpoint last)")
    return best or found[-1]


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into ``model``; a damaged file or another model's weights is one line."""
    todo = "restore it, or pick another checkpoint with --checkpoint"
    if not path.is_file():
        raise damaged(path, "missing", todo)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(path, f"damaged, not a whole safetensors file ({first_line(e)})", todo) from None
    except RuntimeError as e:  # tensors of other shapes
        sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise damaged(
            path,
            f"holds weights of other sizes than config.yaml's model ({sizes[0] if sizes else first_line(e)})",
            "was it copied from another run?",
        ) from None
    if missing or unexpected:
        # safetensors gives the names as sets (lists in older releases)
        parts = [
            f"{len(names)} tensors {word}, e.g. {min(names)}"
            for names, word in ((missing, "missing"), (unexpected, "unexpected"))
            if names
        ]
        raise damaged(path, f"holds another model's weights ({'; '.join(parts)})", "was it copied from another run?")


def last_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name; a damaged file is one line."""
    if not path.is_file():
        raise damaged(path, "missing", "restore it, or pick another checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(
            path, f"damaged, not a whole safetensors file ({first_line(e)})", "restore it, or pick another checkpoint"
        ) from None


def weights_step(checkpoint: Path) -> int:
    with safe_open(str(checkpoint / WEIGHTS), "pt") as f:
        return int((f.metadata() or {}).get("step", -1))


def load_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's training state, as plain tensors and data: loading it never runs code."""
    path = checkpoint / STATE
    todo = f"predict and evaluate do not need it; to resume from an earlier kept checkpoint, remove {checkpoint}"
    if not path.is_file():
        raise damaged(path, "missing", todo)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a file
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise damaged(
                path, "holds Python objects besides tensors and plain data, so it is not loaded (it could run code)", todo
            ) from None
        raise damaged(path, "damaged, not a whole checkpoint (not a torch archive)", todo) from None
    except Exception as e:  # torch reports a cut-short or overwritten archive as several error types
        raise damaged(path, f"damaged, not a whole checkpoint ({type(e).__name__}: {first_line(e)})", todo) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise damaged(path, "not a tfkit training state (no step)", todo)
    if state["step"] != checkpoint_step(checkpoint):
        raise damaged(path, f"is from step {state['step']}, not from this checkpoint's step {checkpoint_step(checkpoint)}", todo)
    return state


def open_run(run_dir: Path, device: torch.device | str = "cpu", checkpoint: str = "auto") -> tuple[Recipe, nn.Module]:
    """Rebuild a trained run's recipe and model from its directory alone."""
    config = read_config(run_dir)
    recipe = registry.get("recipe", config["recipe"])(config)
    recipe.load(run_dir)
    chosen = pick_checkpoint(run_dir, config, checkpoint)
    try:
        model = recipe.build_model()
    except UsageError as e:
        raise damaged(run_dir / CONFIG, str(e), "fix it, or restore the file from a copy of the run") from None
    load_weights(model, chosen / WEIGHTS)
    return recipe, model.to(device).eval()


# -- what the recipe saves --------------------------------------------------------------------------
def write_json(run_dir: Path, name: str, value: Any) -> None:
    atomic_write(run_dir / name, lambda p: p.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8"))


def read_json(run_dir: Path, name: str) -> Any:
    require(run_dir, name)
    try:
        return json.loads((run_dir / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(run_dir / name, f"not valid JSON ({first_line(e)})", "restore it from a copy of the run") from None


def write_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    atomic_write(run_dir / TOKENIZER, lambda p: tokenizer.save(str(p)))


def read_tokenizer(run_dir: Path) -> Tokenizer:
    require(run_dir, TOKENIZER)
    try:
        return Tokenizer.from_file(str(run_dir / TOKENIZER))
    except Exception as e:  # tokenizers raises its own Exception for every kind of bad file
        raise damaged(
            run_dir / TOKENIZER,
            f"not a tokenizer file ({first_line(e)})",
            "restore it from a copy of the run: the model's token ids depend on it",
        ) from None


# -- metrics ----------------------------------------------------------------------------------------
def append_metrics(run_dir: Path, record: dict[str, Any], durable: bool = False) -> None:
    """Add a record; ``durable`` flushes it to disk at once (evaluations, which choose the best checkpoint)."""
    try:
        with open(run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise TfkitError(
            f"{run_dir / METRICS}: could not add a record ({e.strerror}) "
            f"(free some space, then continue with: tfkit train --resume {run_dir})"
        ) from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line that is not a JSON record (damaged or edited) is skipped
    with a warning."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    # text after the last newline is a record still being written (or cut short by a crash): skip it
    complete = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            print(f"warning: {path}: line {number} is not a metrics record; skipped", file=sys.stderr)
            continue
        records.append(record)
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after the checkpoint a resume starts from, so none appear twice."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    atomic_write(run_dir / METRICS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8"))
