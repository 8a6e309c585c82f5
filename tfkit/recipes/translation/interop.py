"""translation's model elsewhere: as a transformers ``MarianMTModel`` folder (``tfkit export RUN OUT
--to hf``) and back (``tfkit train translation --init FOLDER``), and as ONNX graphs (``--to onnx``).

Marian is the original Transformer as transformers has it: post-LN blocks, sinusoidal positions,
multi-head attention, ReLU/GELU/SiLU feed-forwards and layer norms, embeddings scaled by √d_model and
shared by the encoder, the decoder and the output layer; a model with anything else is refused by
the config key that differs. One difference is only a layout: tfkit interleaves the sines and
cosines of a position (dimension 2i a sine, 2i + 1 its cosine), Marian puts all sines first and the
cosines after them. Permuting the residual stream's dimensions the same way in every tensor that
reads or writes it gives the same function exactly (layer norms and attention do not care about the
order of dimensions), so the export permutes instead of approximating.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from torch import Tensor, nn

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
from tfkit.nn.blocks import Parts
from tfkit.nn.position import sinusoids
from tfkit.onnx import Graph
from tfkit.recipes.translation.data import PAD
from tfkit.recipes.translation.model import MAX_POSITIONS, DecoderStep, EncoderGraph

# tfkit's tensors that read the residual stream (its dimensions are their columns); the others that
# touch it write it or scale it (its dimensions are their first axis)
READ_BY_COLUMNS = ("embed.weight", "in_proj.weight", "up.weight")


def marian_renames(encoder_layers: int, decoder_layers: int) -> list[Rename]:
    def attention(mine: str, theirs: str) -> list[Rename]:
        return [
            Rename(f"{mine}.in_proj.{part}", tuple(f"{theirs}.{p}_proj.{part}" for p in "qkv")) for part in ("weight", "bias")
        ] + [Rename(f"{mine}.out_proj.{part}", f"{theirs}.out_proj.{part}") for part in ("weight", "bias")]

    def linear_and_norms(mine: str, theirs: str, norms: dict[str, str]) -> list[Rename]:
        out = [
            Rename(f"{mine}.feed_forward.{ours}.{part}", f"{theirs}.{fc}.{part}")
            for ours, fc in (("up", "fc1"), ("down", "fc2"))
            for part in ("weight", "bias")
        ]
        return out + [
            Rename(f"{mine}.{ours}.{part}", f"{theirs}.{norm}.{part}")
            for ours, norm in norms.items()
            for part in ("weight", "bias")
        ]

    renames = [Rename("embed.weight", "model.shared.weight")]
    for i in range(encoder_layers):
        mine, theirs = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        renames += attention(f"{mine}.self_attn", f"{theirs}.self_attn")
        renames += linear_and_norms(mine, theirs, {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"})
    for i in range(decoder_layers):
        mine, theirs = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        renames += attention(f"{mine}.self_attn", f"{theirs}.self_attn") + attention(
            f"{mine}.cross_attn", f"{theirs}.encoder_attn"
        )
        renames += linear_and_norms(
            mine, theirs, {"norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm", "norm3": "final_layer_norm"}
        )
    return renames


def sines_first(d_model: int) -> Tensor:
    """Marian's dimension j is tfkit's dimension sines_first(d)[j]: the even ones (sines), then the odd."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def permuted(weights: dict[str, Tensor], d_model: int, order: Tensor | None = None) -> dict[str, Tensor]:
    """tfkit's tensors with the residual stream's dimensions reordered (default: to Marian's)."""
    order = sines_first(d_model) if order is None else order
    out = {}
    for name, tensor in weights.items():
        if name.endswith(READ_BY_COLUMNS):
            out[name] = tensor[:, order]
        elif name.endswith("in_proj.bias") or name.endswith("up.bias"):
            out[name] = tensor
        else:  # out_proj and down (their rows write the stream), and the norms
            out[name] = tensor[order]
    return out


def check_exportable(model: dict[str, Any]) -> None:
    """A one-line UsageError naming the first ``model.*`` key whose value Marian cannot hold."""
    wanted = {"position": "sinusoidal", "encoder.block": "post_ln", "decoder.block": "post_ln_decoder"}
    found = {
        "position": model["position"],
        "encoder.block": model["encoder"]["block"],
        "decoder.block": model["decoder"]["block"],
    }
    marian = Parts()  # the post-LN blocks' own parts: what Marian's layers are
    for stack in ("encoder", "decoder"):
        for part in Parts.keys():
            wanted[f"{stack}.{part}"] = getattr(marian, part)
            found[f"{stack}.{part}"] = model[stack].get(part) or wanted[f"{stack}.{part}"]  # None: the block's own
    for key, value in wanted.items():
        if found[key] != value:
            raise UsageError(f"model.{key} '{found[key]}' has no transformers Marian equivalent (MarianMTModel has {value})")


def export_marian(
    model: dict[str, Any],
    weights: dict[str, Tensor],
    tokenizer: Tokenizer,
    specials: dict[str, int],
    max_positions: int,
    max_tokens: int,
    out: Path,
) -> None:
    """``specials``: pad, unk, bos and eos → their ids."""
    check_exportable(model)
    d, vocab = model["d_model"], tokenizer.get_vocab_size()
    encoder_layers, decoder_layers = model["encoder"]["layers"], model["decoder"]["layers"]
    config = {
        "model_type": "marian",
        "architectures": ["MarianMTModel"],
        "vocab_size": vocab,
        "decoder_vocab_size": vocab,
        "d_model": d,
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": model["heads"],
        "decoder_attention_heads": model["heads"],
        "encoder_ffn_dim": model["d_ff"],
        "decoder_ffn_dim": model["d_ff"],
        "activation_function": activation_to_hf(model["activation"]),
        "max_position_embeddings": max_positions,
        "scale_embedding": True,
        "share_encoder_decoder_embeddings": True,
        "tie_word_embeddings": True,
        "dropout": model["dropout"],
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "pad_token_id": specials["pad"],
        "eos_token_id": specials["eos"],
        "bos_token_id": specials["bos"],
        "decoder_start_token_id": specials["bos"],
        "forced_eos_token_id": None,
        "normalize_before": False,
    }
    hf = to_hf(permuted(weights, d), marian_renames(encoder_layers, decoder_layers))
    table = sinusoids(max_positions, d)[:, sines_first(d)]
    hf.update(
        {
            "model.encoder.embed_positions.weight": table,
            "model.decoder.embed_positions.weight": table.clone(),
            "final_logits_bias": torch.zeros(1, vocab),
        }
    )
    write_folder(out, config, hf)
    # the source as tfkit encodes it: its tokens, then </s>
    exported = Tokenizer.from_str(tokenizer.to_str())
    eos = tokenizer.id_to_token(specials["eos"])
    exported.post_processor = TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, specials["eos"])])
    names = {"pad": "pad_token", "unk": "unk_token", "bos": "bos_token", "eos": "eos_token"}
    write_tokenizer(
        out,
        exported,
        max_tokens,
        {**{names[k]: tokenizer.id_to_token(i) for k, i in specials.items()}, "clean_up_tokenization_spaces": False},
    )  # decode as tfkit does


# -- back: tfkit train translation --init FOLDER -----------------------------------------------------
def config_from_marian(folder: Path) -> dict[str, Any]:
    """model.* for a Marian folder's config.json; a Marian that tfkit's model cannot be is one line."""
    hf = read_config(folder, "marian", "Marian")
    same = [("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")]
    for ours, theirs in same:
        if hf.get(ours) != hf.get(theirs):
            raise UsageError(
                f"{folder}: {ours} {hf.get(ours)} and {theirs} {hf.get(theirs)} differ (tfkit's translation model has one of each)"
            )
    for key, wanted in (("scale_embedding", True), ("normalize_before", False), ("share_encoder_decoder_embeddings", True)):
        if hf.get(key, wanted) != wanted:
            raise UsageError(f"{folder}: only Marian models with {key}={wanted} can be imported")
    return {
        "d_model": hf["d_model"],
        "heads": hf["encoder_attention_heads"],
        "d_ff": hf["encoder_ffn_dim"],
        "position": "sinusoidal",
        "activation": activation_from_hf(folder, hf.get("activation_function", "swish")),
        "encoder": {"block": "post_ln", "layers": hf["encoder_layers"]},
        "decoder": {"block": "post_ln_decoder", "layers": hf["decoder_layers"]},
    }


def weights_from_marian(folder: Path, d_model: int, encoder_layers: int, decoder_layers: int) -> dict[str, Tensor]:
    """The folder's tensors in tfkit's names and dimension order (the inverse of the export)."""
    try:
        ours = from_hf(read_weights(folder, ""), marian_renames(encoder_layers, decoder_layers))
    except KeyError as e:
        raise UsageError(f"{folder / 'model.safetensors'} is not a transformers Marian checkpoint (no tensor {e})") from None
    return permuted(ours, d_model, order=torch.argsort(sines_first(d_model)))


def tokenizer_from_marian(folder: Path, specials: list[str]) -> Tokenizer:
    """The folder's tokenizer.json without its post-processor (tfkit appends </s> itself); its
    first ids must be tfkit's special tokens."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{folder} has no tokenizer.json (a sentencepiece-only Marian tokenizer cannot be read)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["post_processor"] = None
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    found = [tokenizer.id_to_token(i) for i in range(len(specials))]
    if found != specials:
        raise UsageError(f"{path}: ids 0-{len(specials) - 1} are {found}, not tfkit's {specials}")
    return tokenizer


# -- ONNX: tfkit export RUN OUT --to onnx -------------------------------------------------------------
def onnx_graphs(model: nn.Module, m: dict[str, Any], vocab: int) -> list[Graph]:
    """The encoder, (B, S) source ids → memory (B, S, D); and one decoder step, the last target
    token (B, 1), the memory, the source ids (for its padding) and the self-attention keys and
    values of the T tokens before → the next token's logits (B, V) and the keys and values of T + 1.
    Cross-attention's keys and values are computed from the memory inside each step. ``m`` is the
    ``model.*`` config."""
    layers, heads, d_model = m["decoder"]["layers"], m["heads"], m["d_model"]

    def sources(batch: int, length: int, generator: torch.Generator) -> Tensor:
        ids = torch.randint(4, vocab, (batch, length), generator=generator)
        ids[1:, length // 2 :] = PAD  # padded rows, so the masks matter
        return ids

    def encoder_example(batch: int, length: int) -> dict[str, Tensor]:
        return {"source_ids": sources(batch, length, torch.Generator().manual_seed(batch * 1000 + length))}

    def step_example(batch: int, length: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(batch * 1000 + length)
        source_ids = sources(batch, length + 3, generator)
        past = torch.randn(2, layers, batch, heads, length, d_model // heads, generator=generator)
        return {
            "token_ids": torch.randint(4, vocab, (batch, 1), generator=generator),
            "memory": torch.randn(batch, length + 3, d_model, generator=generator),
            "source_ids": source_ids,
            "past_keys": past[0],
            "past_values": past[1],
        }

    source = {0: "batch", 1: "source"}
    past = {1: "batch", 3: "past"}
    return [
        Graph(
            "encoder",
            EncoderGraph(model),
            encoder_example,
            ["memory"],
            {"source_ids": source},
            limits={"source": {"max": MAX_POSITIONS}},
        ),
        Graph(
            "decoder_step",
            DecoderStep(model),
            step_example,
            ["logits", "present_keys", "present_values"],
            {"token_ids": {0: "batch"}, "memory": source, "source_ids": source, "past_keys": past, "past_values": past},
            limits={"source": {"max": MAX_POSITIONS}, "past": {"max": MAX_POSITIONS - 1}},
        ),
    ]
