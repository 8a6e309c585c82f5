"""A ViT in and out of tfkit: transformers' ViT folders (import with --init, export) and ONNX graphs.

transformers' ViTModel is :class:`~tfkit.recipes.vit.model.VisionTransformer` with pre-LN blocks,
learned positions and separate query, key and value projections; the renames below map one's tensors
onto the other's. A model it cannot express (another block, another position) is refused by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tfkit.errors import UsageError
from tfkit.hf import (
    Rename,
    activation_from_hf,
    activation_to_hf,
    from_hf,
    labels_config,
    read_config,
    read_weights,
    to_hf,
    write_folder,
)
from tfkit.onnx import Graph
from tfkit.recipes.vit.data import per_channel


def vit_renames(depth: int) -> list[Rename]:
    """:class:`VisionTransformer`'s tensors and ViTModel's; query, key and value are our one fused
    projection. (transformers keeps the positions as (1, N, D), we as (N, D).)"""
    renames = [
        Rename("cls", "embeddings.cls_token"),
        Rename("position", "embeddings.position_embeddings"),
        Rename("patches.proj.weight", "embeddings.patch_embeddings.projection.weight"),
        Rename("patches.proj.bias", "embeddings.patch_embeddings.projection.bias"),
        Rename("encoder.norm.weight", "layernorm.weight"),
        Rename("encoder.norm.bias", "layernorm.bias"),
    ]
    for i in range(depth):
        theirs, mine = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            renames += [
                Rename(
                    f"{mine}self_attn.in_proj.{part}",
                    tuple(f"{theirs}attention.attention.{p}.{part}" for p in ("query", "key", "value")),
                ),
                Rename(f"{mine}self_attn.out_proj.{part}", f"{theirs}attention.output.dense.{part}"),
                Rename(f"{mine}feed_forward.up.{part}", f"{theirs}intermediate.dense.{part}"),
                Rename(f"{mine}feed_forward.down.{part}", f"{theirs}output.dense.{part}"),
                Rename(f"{mine}norm1.{part}", f"{theirs}layernorm_before.{part}"),
                Rename(f"{mine}norm2.{part}", f"{theirs}layernorm_after.{part}"),
            ]
    return renames


def config_from_hf(path: Path) -> dict[str, Any]:
    """The config keys a transformers ViT folder fixes: sizes, image size, channels, normalisation."""
    hf = read_config(path, "vit", "a ViT")
    if not hf.get("qkv_bias", True):
        raise UsageError(f"{path}: only ViTs with query/key/value biases can be imported")
    overrides: dict[str, Any] = {
        "model": {
            "patch": hf["patch_size"],
            "d_model": hf["hidden_size"],
            "depth": hf["num_hidden_layers"],
            "heads": hf["num_attention_heads"],
            "d_ff": hf["intermediate_size"],
            "activation": activation_from_hf(path, hf.get("hidden_act", "gelu")),
            "block": "pre_ln",
            "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
            "position": "learned",
            "attention": None,
            "feed_forward": None,
            "norm": None,
        },
        "data": {"image_size": hf["image_size"], "channels": hf.get("num_channels", 3)},
    }
    if (path / "preprocessor_config.json").is_file():
        pre = _read_json(path / "preprocessor_config.json")
        overrides["data"].update({k: [float(v) for v in pre[f"image_{k}"]] for k in ("mean", "std") if f"image_{k}" in pre})
    return overrides


def load_hf_weights(model: nn.Module, path: Path, classes: int) -> None:
    """Copy a transformers ViT (ViTModel or ViTForImageClassification) into ``model``. The
    classifier comes along when it has ``classes``; otherwise it starts fresh."""
    if not model.learned:
        raise UsageError(f"{path}: a transformers ViT's positions are learned (keep model.position learned with --init)")
    hf = read_weights(path, "vit.")
    try:
        ours = from_hf(hf, vit_renames(len(model.encoder.layers)))
        ours["position"] = ours["position"][0]
    except KeyError as e:
        raise UsageError(f"{path / 'model.safetensors'} is not a transformers ViT checkpoint (no tensor {e})") from None
    head = hf.get("classifier.weight")
    if head is not None and head.shape == model.head.weight.shape:
        ours["head.weight"], ours["head.bias"] = head, hf["classifier.bias"]
    else:
        print(f"note: the classifier starts fresh for {classes} classes", file=sys.stderr)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if unexpected or set(missing) - {"head.weight", "head.bias"}:
        raise UsageError(f"{path}: the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def export_hf(config: dict[str, Any], labels: list[str], model: nn.Module, out: Path) -> None:
    """A ViTForImageClassification folder, with the resizing and normalisation in preprocessor_config.json."""
    m, data = config["model"], config["data"]
    if m["block"] != "pre_ln":
        raise UsageError(f"model.block '{m['block']}' has no transformers ViT equivalent (ViT is pre_ln)")
    if m["position"] != "learned":
        raise UsageError(
            f"model.position '{m['position']}' has no transformers ViT equivalent (ViT learns its positions: "
            f"train with model.position learned to export)"
        )
    for part in ("attention", "feed_forward", "norm"):
        if m[part] is not None:
            raise UsageError(f"model.{part} '{m[part]}' has no transformers ViT equivalent (leave it null to export)")
    channels = data["channels"]
    hf_config = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "image_size": data["image_size"],
        "patch_size": m["patch"],
        "num_channels": channels,
        "hidden_size": m["d_model"],
        "num_hidden_layers": m["depth"],
        "num_attention_heads": m["heads"],
        "intermediate_size": m["d_ff"],
        "hidden_act": activation_to_hf(m["activation"]),
        "layer_norm_eps": m["norm_eps"],
        "qkv_bias": True,
        "hidden_dropout_prob": m["dropout"],
        "attention_probs_dropout_prob": m["dropout"],
        **labels_config(labels),
    }
    ours = model.state_dict()
    hf = {f"vit.{k}": v for k, v in to_hf({**ours, "position": ours["position"][None]}, vit_renames(m["depth"])).items()}
    write_folder(out, hf_config, {**hf, "classifier.weight": ours["head.weight"], "classifier.bias": ours["head.bias"]})
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "ViTImageProcessor",
                "do_resize": True,
                "size": {"height": data["image_size"], "width": data["image_size"]},
                "resample": 2,  # bilinear, as torchvision's resize
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": per_channel(data["mean"], channels),
                "image_std": per_channel(data["std"], channels),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def onnx_graphs(model: nn.Module, data: dict[str, Any], normalise: Callable[[Tensor], Tensor]) -> list[Graph]:
    """Normalised (B, C, H, W) images at data.image_size → logits (B, classes)."""

    def example(batch: int, length: int) -> dict[str, Tensor]:
        images = torch.randint(
            0,
            256,
            (batch, data["channels"], data["image_size"], data["image_size"]),
            dtype=torch.uint8,
            generator=torch.Generator().manual_seed(batch),
        )
        return {"pixel_values": normalise(images)}

    return [Graph("model", model, example, ["logits"], {"pixel_values": {0: "batch"}})]


def onnx_processing(data: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    channels = data["channels"]
    return {
        "image_size": data["image_size"],
        "channels": channels,
        "labels": labels,
        "mean": per_channel(data["mean"], channels),
        "std": per_channel(data["std"], channels),
        "inputs": "pixel_values: the image as L (channels 1) or RGB, transparency over white, its shorter side resized "
        "to image_size (bilinear, antialiased) and centre-cropped square, then (pixel / 255 - mean) / std",
        "outputs": "logits (B, classes): softmax for each label's probability",
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
