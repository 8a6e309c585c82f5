"""Folders as Hugging Face ``transformers`` saves them: their config.json and model.safetensors, read
for ``--init`` and written by ``tfkit export --to hf``. Each recipe names its tensors' counterparts in
one table of :class:`Rename` rows, read one way on import and the other way on export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from tfkit.errors import UsageError

# tfkit's activation names → transformers' (ACT2FN); import reads every name that maps back
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "swish": "silu", "gelu_tanh": "gelu_new"}
ACTIVATIONS_FROM_HF = {**{v: k for k, v in ACTIVATIONS.items()}, "gelu_pytorch_tanh": "gelu_tanh", "swish": "swish"}


@dataclass(frozen=True)
class Rename:
    """One tensor of a tfkit model and the transformers tensor or tensors it is. Several are stacked
    along the first dimension (query, key and value in one fused projection: BERT and ViT keep three);
    ``transpose`` for GPT-2's Conv1D, which stores a weight as (in, out)."""

    ours: str
    theirs: str | tuple[str, ...]
    transpose: bool = False


def from_hf(hf: dict[str, Tensor], renames: list[Rename]) -> dict[str, Tensor]:
    """transformers tensors → ours; a missing tensor raises KeyError with its name."""
    out = {}
    for r in renames:
        parts = [hf[name] for name in ((r.theirs,) if isinstance(r.theirs, str) else r.theirs)]
        joined = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[r.ours] = joined.t().contiguous() if r.transpose else joined
    return out


def to_hf(ours: dict[str, Tensor], renames: list[Rename]) -> dict[str, Tensor]:
    """Our tensors → transformers' (the inverse of :func:`from_hf`)."""
    out = {}
    for r in renames:
        tensor = ours[r.ours].t() if r.transpose else ours[r.ours]
        names = (r.theirs,) if isinstance(r.theirs, str) else r.theirs
        out.update(zip(names, tensor.chunk(len(names)) if len(names) > 1 else [tensor]))
    return out


def activation_to_hf(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise UsageError(f"model.activation '{activation}' has no transformers equivalent (valid: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[activation]


def activation_from_hf(folder: Path, name: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise UsageError(f"{folder}: activation '{name}' cannot be imported (valid: {', '.join(ACTIVATIONS_FROM_HF)})")
    return ACTIVATIONS_FROM_HF[name]


def write_folder(out: Path, config: dict[str, Any], weights: dict[str, Tensor]) -> None:
    """config.json and model.safetensors as ``save_pretrained`` writes them (tied tensors left out:
    transformers ties them again on load)."""
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in weights.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_tokenizer(out: Path, tokenizer: Tokenizer, max_length: int, settings: dict[str, Any]) -> None:
    """tokenizer.json and the tokenizer_config.json ``AutoTokenizer`` needs to load it as it is
    (``settings``: pad_token, cls_token, ... → the token, and model_input_names)."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **settings}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def labels_config(labels: list[str]) -> dict[str, Any]:
    """id2label and label2id, as a transformers classifier's config.json holds its class names."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


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
