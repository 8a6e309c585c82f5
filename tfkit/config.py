"""Configs are plain nested dicts read from YAML.

A recipe's YAML file is also its schema: a user's config file and ``--set key=value`` overrides may
only name keys that file has, with values of the same type (a ``null`` default takes anything).
A default of ``auto`` takes an integer, or ``auto``: the recipe then chooses the value from the data
when it prepares it (:meth:`tfkit.recipe.Recipe.settle`). Any key named after a registry kind
(``attention: multi_head``) must name a registered component, and a number under a name in
``RANGES`` (``batch_size``, ``dropout``, ``lr``, ...) must lie in that name's range wherever the key
stands, so that a zero batch or a dropout of 1.5 fails before any work.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tfkit import registry
from tfkit.errors import UsageError


def _ranges(*rules: tuple[str, Any, tuple[str, ...]]) -> dict[str, tuple[str, Any]]:
    return {key: (words, test) for words, test, keys in rules for key in keys}


RANGES = _ranges(
    ("at least 1", lambda v: v >= 1, (
        "d_model", "heads", "d_ff", "layers", "depth", "patch", "kernel_size", "subsampling_channels", "max_positions",
        "max_length", "max_tokens", "max_answer_length", "max_number", "n_mels", "channels", "image_size",
        "sample_rate", "window_ms", "hop_ms", "train_size", "validation_size", "test_size", "batch_size",
        "accumulate", "epochs", "log_every", "save_every", "keep_last", "timeout", "beam", "top_k", "block_size", "max_new_tokens", "stride", "voices",
    )),
    ("at least 0 (0 turns it off)", lambda v: v >= 0, (
        "eval_every", "warmup", "clip_grad_norm", "weight_decay", "mixup", "cutmix", "freq_masks", "freq_width",
        "time_masks", "time_width", "patience", "temperature",
    )),
    # train.steps 0 writes a run of the initial weights: a pretrained model to predict and evaluate with
    ("at least 0", lambda v: v >= 0, ("steps", "seed", "vocab_size", "doc_stride", "max_len_a", "max_len_b", "pause_s")),
    ("greater than 0", lambda v: v > 0, ("lr", "eps", "norm_eps", "std", "repetition_penalty", "factors", "rt60_s", "warp")),
    ("at least 0 and below 1", lambda v: 0 <= v < 1, ("dropout", "drop_path", "label_smoothing", "held_out", "betas")),
    ("between 0 and 1", lambda v: 0 <= v <= 1, ("mask_prob", "time_ratio", "rate")),
    ("above 0 and at most 1", lambda v: 0 < v <= 1, ("top_p",)),
)

AUTO = "auto"

# keys with a fixed set of values, checked with the rest of the config, before any data is read
CHOICES = {"train.strategy": ("ddp", "fsdp")}


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


def check_values(config: dict[str, Any], prefix: str = "") -> None:
    """Every key named after a registry kind names a registered component, every key in ``CHOICES``
    holds one of its values, and every number under a name in ``RANGES`` (each item, for a list such
    as ``betas``) lies in that name's range."""
    kinds = set(registry.kinds())
    for key, value in config.items():
        if isinstance(value, dict):
            check_values(value, f"{prefix}{key}.")
        elif key in kinds:
            try:
                registry.get(key, value)
            except UsageError as e:
                raise UsageError(f"config key '{prefix}{key}': {e}") from None
        elif f"{prefix}{key}" in CHOICES:
            if value not in CHOICES[f"{prefix}{key}"]:
                raise UsageError(f"unknown {prefix}{key} {value!r} (valid: {', '.join(CHOICES[f'{prefix}{key}'])})")
        elif key in RANGES and value != AUTO:
            words, test = RANGES[key]
            numbers = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and test(v) for v in numbers):
                raise UsageError(f"config key '{prefix}{key}' must be {words}, got {value!r}")


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
