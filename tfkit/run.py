"""The run directory: everything predict, evaluate, inspect-attention and resume need.

    config.yaml        the resolved config
    model.safetensors  the latest checkpoint's weights (its metadata holds the step)
    tokenizer.json     or labels.json: what the recipe saves
    state.pt           optimiser, scheduler, RNG and data position (torch.load(weights_only=True))
    metrics.jsonl      one JSON object per log or evaluation step

Every file is written to a temporary name and renamed over the old one, so a crash at any moment
leaves the previous complete file in place.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import nn

from tfkit import config as configs
from tfkit import registry
from tfkit.errors import UsageError

if TYPE_CHECKING:
    from tfkit.recipe import Recipe

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
METRICS = "metrics.jsonl"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


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


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    atomic_write(run_dir / CONFIG, lambda p: p.write_text(configs.dump(config), encoding="utf-8"))


def save_checkpoint(run_dir: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Weights first, then state: resume checks that both carry the same step."""
    step = str(state["step"])
    atomic_write(run_dir / WEIGHTS, lambda p: save_model(model, str(p), metadata={"step": step}))
    atomic_write(run_dir / STATE, lambda p: torch.save(state, p))


def weights_step(run_dir: Path) -> int:
    with safe_open(str(run_dir / WEIGHTS), "pt") as f:
        return int((f.metadata() or {}).get("step", -1))


def load_state(run_dir: Path) -> dict[str, Any]:
    require(run_dir, STATE)
    state = torch.load(run_dir / STATE, weights_only=True)
    if weights_step(run_dir) != state["step"]:
        raise UsageError(
            f"{run_dir}: {WEIGHTS} is from step {weights_step(run_dir)} but {STATE} from step {state['step']} "
            "(the run was stopped while saving; the weights are usable for predict, not for --resume)"
        )
    return state


def require(run_dir: Path, *names: str) -> None:
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} does not exist (pass the directory tfkit train printed)")
    for name in names:
        if not (run_dir / name).is_file():
            raise UsageError(f"run directory {run_dir} has no {name} (is it a complete tfkit run?)")


def read_config(run_dir: Path) -> dict[str, Any]:
    require(run_dir, CONFIG)
    return configs.read_yaml(run_dir / CONFIG)


def open_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Recipe, nn.Module]:
    """Rebuild a trained run's recipe and model from its directory alone."""
    require(run_dir, CONFIG, WEIGHTS)
    config = read_config(run_dir)
    recipe_cls = registry.get("recipe", str(config.get("recipe")))
    recipe = recipe_cls(configs.merge(recipe_cls.default_config(), config))
    recipe.load(run_dir)
    model = recipe.build_model()
    load_model(model, str(run_dir / WEIGHTS))
    return recipe, model.to(device).eval()


def write_json(run_dir: Path, name: str, value: Any) -> None:
    atomic_write(run_dir / name, lambda p: p.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8"))


def read_json(run_dir: Path, name: str) -> Any:
    require(run_dir, name)
    return json.loads((run_dir / name).read_text(encoding="utf-8"))


def write_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    atomic_write(run_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)))


def read_tokenizer(run_dir: Path) -> Tokenizer:
    require(run_dir, "tokenizer.json")
    return Tokenizer.from_file(str(run_dir / "tokenizer.json"))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    # text after the last newline is a record still being written (or cut short by a crash): skip it
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after the checkpoint a resume starts from, so none appear twice."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write(run_dir / METRICS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8"))
