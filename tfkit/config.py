"""Configs are plain nested dicts read from YAML.

A recipe's defaults are the trainer's ``train.yaml`` with the recipe's YAML laid over it
(:func:`layer`); that pair is also the schema: a user's config file and ``--set key=value`` overrides may
only name keys that file has, with values of the same type (a ``null`` default takes anything).
A default of ``auto`` takes an integer, or ``auto``: the recipe then chooses the value from the data
when it prepares it (:meth:`tfkit.recipe.Recipe.settle`). Any key named after a registry kind
(``attention: multi_head``) must name a registered component (``null`` keeps a block's own part), a
key in ``CHOICES`` one of its values, and a number under a name in ``RANGES`` (``batch_size``,
``dropout``, ``lr``, ...) must lie in that name's range wherever the key stands, so that a zero batch
or a dropout of 1.5 fails before any work. A recipe declares the ranges and choices of its own keys.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tfkit import registry
from tfkit.errors import UsageError


def ranges(*rules: tuple[str, Any, tuple[str, ...]]) -> dict[str, tuple[str, Any]]:
    """``(words, test, key names)`` rules → {key name: (words, test)}; a recipe declares its own keys'
    ranges this way (:attr:`tfkit.recipe.Recipe.ranges`)."""
    return {key: (words, test) for words, test, keys in rules for key in keys}


AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
AT_LEAST_0 = ("at least 0", lambda v: v >= 0)
OFF_AT_0 = ("at least 0 (0 turns it off)", lambda v: v >= 0)
POSITIVE = ("greater than 0", lambda v: v > 0)
FRACTION = ("at least 0 and below 1", lambda v: 0 <= v < 1)
PROBABILITY = ("between 0 and 1", lambda v: 0 <= v <= 1)

# the keys of the trainer and of the model sizes every recipe shares; a recipe adds its own
RANGES = ranges(
    (
        *AT_LEAST_1,
        (
            "d_model",
            "heads",
            "d_ff",
            "layers",
            "max_positions",
            "max_length",
            "max_tokens",
            "train_size",
            "validation_size",
            "test_size",
            "batch_size",
            "accumulate",
            "epochs",
            "log_every",
            "save_every",
            "keep_last",
            "timeout",
            "beam",
            "top_k",
            "max_new_tokens",
        ),
    ),
    (*OFF_AT_0, ("eval_every", "warmup", "clip_grad_norm", "weight_decay", "patience", "temperature")),
    # train.steps 0 writes a run of the initial weights: a pretrained model to predict and evaluate with
    (*AT_LEAST_0, ("steps", "seed", "vocab_size")),
    (*POSITIVE, ("lr", "eps", "norm_eps", "repetition_penalty", "minutes")),
    (*FRACTION, ("dropout", "drop_path", "label_smoothing", "betas")),
    ("above 0 and at most 1", lambda v: 0 < v <= 1, ("top_p",)),
)

AUTO = "auto"

# the trainer's keys with a fixed set of values; a recipe adds its own (:attr:`tfkit.recipe.Recipe.choices`)
CHOICES = {
    "train.optimizer": ("adam", "adamw"),
    "train.schedule": ("noam", "warmup_cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.strategy": ("ddp", "fsdp"),
    "train.best_mode": ("auto", "min", "max"),
}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values")
    return data


def layer(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on it, section by section; ``over`` may add keys. For composing
    defaults (the trainer's under a recipe's), never for user input, which :func:`merge` checks."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = layer(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def merge(base: dict[str, Any], override: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return ``base`` updated with ``override``; unknown keys and wrong types are errors."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise UsageError(f"unknown config key '{path}' (valid keys {where}: {', '.join(base)})")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise UsageError(f"config key '{path}' is a section (set one of its keys: {', '.join(default)})")
            merged[key] = merge(default, value, path + ".")
        else:
            merged[key] = _coerce(path, default, value)
    return merged


def _coerce(path: str, default: Any, value: Any) -> Any:
    if default is None:
        return value
    if default == AUTO and path in CHOICES:  # "auto" is one of the choices (train.precision), checked with them
        return value
    if default == AUTO:
        if value == AUTO or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise UsageError(f"config key '{path}' expects an integer or auto, got {value!r}")
    expected = type(default)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    raise UsageError(f"config key '{path}' expects {names.get(expected, expected.__name__)}, got {value!r}")


def parse_set(item: str) -> dict[str, Any]:
    """``"model.encoder.layers=4"`` → ``{"model": {"encoder": {"layers": 4}}}``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise UsageError(f"malformed --set '{item}' (expected key=value, for example train.lr=0.001)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 64}} → {"model.d_model": 64}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_values(config: dict[str, Any]) -> None:
    """Every key named after a registry kind names a registered component, every key in ``CHOICES``
    holds one of its values, and every number under a name in ``RANGES`` (each item, for a list such
    as ``betas``) lies in that name's range; the recipe's own choices and ranges count too."""
    recipe = registry.get("recipe", config["recipe"]) if "recipe" in config else None
    _check(config, {**RANGES, **getattr(recipe, "ranges", {})}, {**CHOICES, **getattr(recipe, "choices", {})})


def _check(
    config: dict[str, Any], ranges: dict[str, tuple[str, Any]], choices: dict[str, tuple[str, ...]], prefix: str = ""
) -> None:
    kinds = set(registry.kinds())
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            _check(value, ranges, choices, f"{path}.")
        elif key in kinds and value is not None:
            try:
                registry.get(key, value)
            except UsageError as e:
                raise UsageError(f"config key '{path}': {e}") from None
        elif path in choices:
            if value not in choices[path]:
                raise UsageError(f"unknown {path} {value!r} (valid: {', '.join(map(str, choices[path]))})")
        elif key in ranges and value not in (AUTO, None):
            words, test = ranges[key]
            numbers = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and test(v) for v in numbers):
                raise UsageError(f"config key '{path}' must be {words}, got {value!r}")


def resolve(defaults: dict[str, Any], config_file: Path | None = None, sets: list[str] = ()) -> dict[str, Any]:
    config = defaults
    if config_file is not None:
        config = merge(config, read_yaml(config_file))
    for item in sets:
        config = merge(config, parse_set(item))
    check_values(config)
    return config


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
