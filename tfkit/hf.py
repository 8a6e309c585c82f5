"""Folders as Hugging Face ``transformers`` saves them: their config.json and model.safetensors, read
for ``--init`` (each recipe renames the tensors to its own model's names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from tfkit.errors import UsageError


def read_config(folder: Path, model_type: str, name: str) -> dict[str, Any]:
    """``folder``'s config.json, which must describe a ``model_type`` model (``name`` in messages)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} could not be read ({type(e).__name__}; is {folder} a transformers {name} folder?)") from None
    if not isinstance(config, dict) or config.get("model_type") != model_type:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise UsageError(f"{path} describes a '{found}' model, not {name}")
    return config


def read_weights(folder: Path, prefix: str) -> dict[str, Tensor]:
    """``folder``'s model.safetensors, with ``prefix`` (the task model's name for the base model:
    ``bert.``, ``vit.``, ``transformer.``) taken off the tensor names."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"{folder} has no model.safetensors (only safetensors weights are loaded)")
    try:
        return {key.removeprefix(prefix): value for key, value in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path}: damaged, not a whole safetensors file ({type(e).__name__})") from None
