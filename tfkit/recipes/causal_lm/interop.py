"""A causal LM outside tfkit: Hugging Face ``transformers`` folders both ways, and the ONNX graph.

A GPT-2 or Llama folder's config.json gives tfkit model sizes and its weights are renamed to
:class:`~tfkit.recipes.causal_lm.model.CausalLM`'s (``--init``); a run's model becomes a
``GPT2LMHeadModel`` (block gpt) or ``LlamaForCausalLM`` (block llama) folder (``tfkit export --to hf``)
only when every part and its position are the ones that class has. The ONNX graph is the whole
forward pass to next-token logits (``tfkit export --to onnx``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from tfkit import registry
from tfkit.errors import UsageError
from tfkit.hf import (
    Rename,
    activation_from_hf,
    activation_to_hf,
    from_hf,
    read_config,
    read_weights,
    to_hf,
    write_folder,
    write_tokenizer,
)
from tfkit.onnx import Graph
from tfkit.recipes.causal_lm.data import END_OF_TEXT

RMS_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm's epsilon when none is given, as our llama block's norms are built
ROPE_THETA = 10000.0  # RotaryPosition's base


def gpt2_renames(layers: int) -> list[Rename]:
    """:class:`CausalLM`'s tensors (block gpt, learned positions) and GPT2Model's. GPT-2's Conv1D
    layers store their weights as (in, out), so they are transposed; c_attn is already one fused
    query, key and value projection, as ours is."""
    renames = [
        Rename("tokens.weight", "wte.weight"),
        Rename("position.table", "wpe.weight"),
        Rename("decoder.norm.weight", "ln_f.weight"),
        Rename("decoder.norm.bias", "ln_f.bias"),
    ]
    for i in range(layers):
        theirs, mine = f"h.{i}.", f"decoder.layers.{i}."
        for conv, linear in (
            ("attn.c_attn", "self_attn.in_proj"),
            ("attn.c_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "feed_forward.up"),
            ("mlp.c_proj", "feed_forward.down"),
        ):
            renames += [
                Rename(f"{mine}{linear}.weight", f"{theirs}{conv}.weight", transpose=True),
                Rename(f"{mine}{linear}.bias", f"{theirs}{conv}.bias"),
            ]
        for norm, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            renames += [Rename(f"{mine}{ours}.{part}", f"{theirs}{norm}.{part}") for part in ("weight", "bias")]
    return renames


def llama_renames(layers: int) -> list[Rename]:
    """:class:`CausalLM`'s tensors (block llama, rotary positions) and LlamaModel's: our fused query,
    key and value projection is their three, our [gate; up] their two."""
    renames = [Rename("tokens.weight", "embed_tokens.weight"), Rename("decoder.norm.weight", "norm.weight")]
    for i in range(layers):
        theirs, mine = f"layers.{i}.", f"decoder.layers.{i}."
        renames += [
            Rename(f"{mine}norm1.weight", f"{theirs}input_layernorm.weight"),
            Rename(f"{mine}self_attn.in_proj.weight", tuple(f"{theirs}self_attn.{p}_proj.weight" for p in "qkv")),
            Rename(f"{mine}self_attn.out_proj.weight", f"{theirs}self_attn.o_proj.weight"),
            Rename(f"{mine}norm2.weight", f"{theirs}post_attention_layernorm.weight"),
            Rename(f"{mine}feed_forward.gate_up.weight", (f"{theirs}mlp.gate_proj.weight", f"{theirs}mlp.up_proj.weight")),
            Rename(f"{mine}feed_forward.down.weight", f"{theirs}mlp.down_proj.weight"),
        ]
    return renames


def _model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return "gpt2"  # read_config then names what is wrong with the file


def config_from_hf(folder: Path) -> dict[str, Any]:
    """model.* for a transformers GPT-2 or Llama folder's config.json."""
    return llama_config_from_hf(folder) if _model_type(folder) == "llama" else gpt2_config_from_hf(folder)


def weights_from_hf(folder: Path, layers: int) -> dict[str, Tensor]:
    """A GPT-2 (GPT2Model or GPT2LMHeadModel) or Llama (LlamaModel or LlamaForCausalLM) checkpoint in
    :class:`CausalLM`'s names."""
    llama = _model_type(folder) == "llama"
    hf = read_weights(folder, "model." if llama else "transformer.")
    try:
        return from_hf(hf, llama_renames(layers) if llama else gpt2_renames(layers))
    except KeyError as e:
        raise UsageError(
            f"{folder / 'model.safetensors'} is not a transformers {'Llama' if llama else 'GPT-2'} checkpoint (no tensor {e})"
        ) from None


def gpt2_config_from_hf(folder: Path) -> dict[str, Any]:
    hf = read_config(folder, "gpt2", "GPT-2")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise UsageError(f"{folder}: only GPT-2s with LayerNorm eps 1e-5 can be imported")
    return {
        "block": "gpt",
        "position": "learned",
        "d_model": hf["n_embd"],
        "heads": hf["n_head"],
        "layers": hf["n_layer"],
        "d_ff": hf.get("n_inner") or 4 * hf["n_embd"],
        "activation": activation_from_hf(folder, hf.get("activation_function", "gelu_new")),
        "max_positions": hf["n_positions"],
    }


def llama_config_from_hf(folder: Path) -> dict[str, Any]:
    hf = read_config(folder, "llama", "Llama")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", ROPE_THETA)}
    heads = hf["num_attention_heads"]
    problems = [
        f"rms_norm_eps {hf.get('rms_norm_eps')} (ours is float32's epsilon, {RMS_EPS:.8g})"
        if abs(hf.get("rms_norm_eps", 1e-6) - RMS_EPS) > 1e-12
        else "",
        f"rope {rope}"
        if rope.get("rope_type", "default") != "default" or float(rope.get("rope_theta", ROPE_THETA)) != ROPE_THETA
        else "",
        "grouped key/value heads" if hf.get("num_key_value_heads", heads) != heads else "",
        "biases" if hf.get("attention_bias") or hf.get("mlp_bias") else "",
        "untied output embeddings" if not hf.get("tie_word_embeddings", False) else "",
    ]
    if any(problems):
        raise UsageError(f"{folder}: this Llama cannot be imported ({', '.join(p for p in problems if p)})")
    return {
        "block": "llama",
        "position": "rotary",
        "d_model": hf["hidden_size"],
        "heads": heads,
        "layers": hf["num_hidden_layers"],
        "d_ff": hf["intermediate_size"],
        "activation": activation_from_hf(folder, hf.get("hidden_act", "silu")),
        "max_positions": hf["max_position_embeddings"],
    }


def refuse_unrepresentable(model: dict[str, Any]) -> None:
    """A UsageError naming the first model.* key whose choice GPT2LMHeadModel or LlamaForCausalLM cannot
    hold: they have one position and one kind of each part, the block's own."""
    if model["family"] != "transformer":
        raise UsageError(f"model.family '{model['family']}' has no transformers equivalent (export it with --to onnx)")
    theirs = {"gpt": ("GPT2LMHeadModel", "learned"), "llama": ("LlamaForCausalLM", "rotary")}
    if model["block"] not in theirs:
        raise UsageError(
            f"model.block '{model['block']}' has no transformers equivalent (gpt and llama have; export it with --to onnx)"
        )
    name, position = theirs[model["block"]]
    own = registry.get("block", model["block"]).parts
    for key, wanted in (
        ("position", position),
        ("attention", own.attention),
        ("feed_forward", own.feed_forward),
        ("norm", own.norm),
    ):
        if model[key] not in (None, wanted):
            raise UsageError(
                f"model.{key} '{model[key]}' with model.block {model['block']} has no transformers equivalent "
                f"({name} has {wanted}; export it with --to onnx)"
            )


def export_hf(model: dict[str, Any], weights: dict[str, Tensor], tokenizer: Tokenizer, eot: int, out: Path) -> None:
    """A causal-lm run's model (its model.* config and tensors) as a GPT2LMHeadModel or
    LlamaForCausalLM folder, with the byte-level BPE as a fast tokenizer."""
    refuse_unrepresentable(model)
    common = {"vocab_size": tokenizer.get_vocab_size(), "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True}
    if model["block"] == "gpt":
        config = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            **common,
            "n_embd": model["d_model"],
            "n_head": model["heads"],
            "n_layer": model["layers"],
            "n_inner": model["d_ff"],
            "n_positions": model["max_positions"],
            "activation_function": activation_to_hf(model["activation"]),
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": model["dropout"],
            "embd_pdrop": model["dropout"],
            "attn_pdrop": model["dropout"],
        }
        hf = {f"transformer.{k}": v for k, v in to_hf(weights, gpt2_renames(model["layers"])).items()}
    else:
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            **common,
            "hidden_size": model["d_model"],
            "num_attention_heads": model["heads"],
            "num_key_value_heads": model["heads"],
            "head_dim": model["d_model"] // model["heads"],
            "num_hidden_layers": model["layers"],
            "intermediate_size": model["d_ff"],
            "max_position_embeddings": model["max_positions"],
            "hidden_act": activation_to_hf(model["activation"]),
            "rms_norm_eps": RMS_EPS,
            "attention_bias": False,
            "mlp_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
            "rope_theta": ROPE_THETA,
            "attention_dropout": model["dropout"],
        }
        hf = {f"model.{k}": v for k, v in to_hf(weights, llama_renames(model["layers"])).items()}
    write_folder(out, config, hf)
    write_tokenizer(
        out,
        tokenizer,
        model["max_positions"],
        {
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": END_OF_TEXT,
            "model_input_names": ["input_ids", "attention_mask"],
        },
    )


class NextTokenLogits(nn.Module):
    """A causal LM's forward and output layer in one graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.model.logits(self.model(token_ids))


def onnx_graph(model: nn.Module, vocab: int, max_positions: int) -> Graph:
    """(B, T) token ids → next-token logits at every position (B, T, V), the whole forward pass."""

    def example(batch: int, length: int) -> dict[str, Tensor]:
        return {
            "token_ids": torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 1000 + length))
        }

    return Graph(
        "model",
        NextTokenLogits(model),
        example,
        ["logits"],
        {"token_ids": {0: "batch", 1: "length"}},
        limits={"length": {"max": max_positions}},
    )
