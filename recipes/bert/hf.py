"""Hugging Face ``transformers`` BERT folders: their config.json as tfkit model sizes, their weights
renamed to :class:`~tfkit.recipes.bert.model.Bert`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tfkit.errors import UsageError
from tfkit.hf import read_config, read_weights

def bert_config_from_hf(folder: Path) -> dict[str, Any]:
    """model.* overrides for a transformers BERT folder's config.json."""
    hf = read_config(folder, "bert", "BERT")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise UsageError(f"{folder}: only BERTs with GELU and absolute positions can be imported")
    return {
        "d_model": hf["hidden_size"], "heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
        "layers": hf["num_hidden_layers"], "activation": "gelu", "block": "post_ln",
        "max_positions": hf["max_position_embeddings"], "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
    }


def bert_weights_from_hf(folder: Path, layers: int) -> dict[str, Tensor]:
    """A transformers BERT checkpoint (BertModel or Bert*For*, safetensors) renamed to :class:`Bert`'s
    names; query, key and value fuse into one projection."""
    hf = {key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): value
          for key, value in read_weights(folder, "bert.").items()}
    try:
        ours = {
            "embed.tokens.weight": hf["embeddings.word_embeddings.weight"],
            "embed.segments.weight": hf["embeddings.token_type_embeddings.weight"],
            "embed.position.table": hf["embeddings.position_embeddings.weight"],
            "embed.norm.weight": hf["embeddings.LayerNorm.weight"],
            "embed.norm.bias": hf["embeddings.LayerNorm.bias"],
            "pooler.weight": hf["pooler.dense.weight"],
            "pooler.bias": hf["pooler.dense.bias"],
        }
        for i in range(layers):
            theirs, mine = f"encoder.layer.{i}.", f"encoder.layers.{i}."
            for part in ("weight", "bias"):
                qkv = [hf[f"{theirs}attention.self.{p}.{part}"] for p in ("query", "key", "value")]
                ours[f"{mine}self_attn.in_proj.{part}"] = torch.cat(qkv)
                ours[f"{mine}self_attn.out_proj.{part}"] = hf[f"{theirs}attention.output.dense.{part}"]
                ours[f"{mine}norm1.{part}"] = hf[f"{theirs}attention.output.LayerNorm.{part}"]
                ours[f"{mine}feed_forward.up.{part}"] = hf[f"{theirs}intermediate.dense.{part}"]
                ours[f"{mine}feed_forward.down.{part}"] = hf[f"{theirs}output.dense.{part}"]
                ours[f"{mine}norm2.{part}"] = hf[f"{theirs}output.LayerNorm.{part}"]
    except KeyError as e:
        raise UsageError(f"{folder / 'model.safetensors'} is not a transformers BERT checkpoint (no tensor {e})") from None
    return ours
