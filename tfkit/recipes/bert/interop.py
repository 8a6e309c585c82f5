"""Hugging Face ``transformers`` BERT folders, both ways: their config.json as tfkit model sizes and
their weights renamed to :class:`~tfkit.recipes.bert.model.Bert`'s (``--init``), and a run's model as
a ``BertForPreTraining``, ``BertForSequenceClassification``, ``BertForTokenClassification`` or
``BertForQuestionAnswering`` folder (``tfkit export --to hf``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from tfkit.errors import UsageError
from tfkit.hf import (
    Rename,
    activation_from_hf,
    activation_to_hf,
    from_hf,
    read_config,
    read_weights,
    to_hf,
)


def check_representable(model: dict[str, Any]) -> None:
    """Refuse, in one line naming the config key, a model.* config that a transformers BERT cannot hold:
    a post-LN stack of multi-head attention, MLP and LayerNorm over learned positions."""
    if model["block"] != "post_ln":
        raise UsageError(f"model.block '{model['block']}' has no transformers BERT equivalent (BERT is post_ln)")
    if model["position"] != "learned":
        raise UsageError(
            f"model.position '{model['position']}' has no transformers BERT equivalent (BERT's positions are learned)"
        )
    for key, bert in (("attention", "multi_head"), ("feed_forward", "mlp"), ("norm", "layer_norm")):
        if model[key] not in (None, bert):
            raise UsageError(f"model.{key} '{model[key]}' has no transformers BERT equivalent (BERT's is {bert}: set it to null)")


def bert_config_from_hf(folder: Path) -> dict[str, Any]:
    """model.* overrides for a transformers BERT folder's config.json."""
    hf = read_config(folder, "bert", "BERT")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UsageError(f"{folder}: only BERTs with absolute positions can be imported")
    return {
        "d_model": hf["hidden_size"],
        "heads": hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"],
        "layers": hf["num_hidden_layers"],
        "activation": activation_from_hf(folder, hf.get("hidden_act", "gelu")),
        "block": "post_ln",
        "position": "learned",
        "attention": None,
        "feed_forward": None,
        "norm": None,
        "max_positions": hf["max_position_embeddings"],
        "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
    }


def bert_config_to_hf(model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """A transformers BertConfig (as config.json) for a tfkit BERT's model.* config."""
    check_representable(model)
    return {
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": model["d_model"],
        "num_hidden_layers": model["layers"],
        "num_attention_heads": model["heads"],
        "intermediate_size": model["d_ff"],
        "hidden_act": activation_to_hf(model["activation"]),
        "max_position_embeddings": model["max_positions"],
        "type_vocab_size": 2,
        "layer_norm_eps": model["norm_eps"],
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": model["dropout"],
        "attention_probs_dropout_prob": model["dropout"],
        "tie_word_embeddings": True,
    }


def bert_renames(layers: int) -> list[Rename]:
    """:class:`Bert`'s tensors and BertModel's; query, key and value are our one fused projection."""
    renames = [
        Rename("embed.tokens.weight", "embeddings.word_embeddings.weight"),
        Rename("embed.segments.weight", "embeddings.token_type_embeddings.weight"),
        Rename("embed.position.table", "embeddings.position_embeddings.weight"),
        Rename("embed.norm.weight", "embeddings.LayerNorm.weight"),
        Rename("embed.norm.bias", "embeddings.LayerNorm.bias"),
    ]
    for i in range(layers):
        theirs, mine = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            renames += [
                Rename(
                    f"{mine}self_attn.in_proj.{part}",
                    tuple(f"{theirs}attention.self.{p}.{part}" for p in ("query", "key", "value")),
                ),
                Rename(f"{mine}self_attn.out_proj.{part}", f"{theirs}attention.output.dense.{part}"),
                Rename(f"{mine}norm1.{part}", f"{theirs}attention.output.LayerNorm.{part}"),
                Rename(f"{mine}feed_forward.up.{part}", f"{theirs}intermediate.dense.{part}"),
                Rename(f"{mine}feed_forward.down.{part}", f"{theirs}output.dense.{part}"),
                Rename(f"{mine}norm2.{part}", f"{theirs}output.LayerNorm.{part}"),
            ]
    return renames


# the tanh pooler over [CLS]: per-token task models (tags, qa) have none in transformers
POOLER = [Rename("pooler.weight", "pooler.dense.weight"), Rename("pooler.bias", "pooler.dense.bias")]

# the heads: BertForPretraining's and BertWithHead's tensors beside the transformers task model's
PRETRAINING_HEADS = [
    Rename("mlm_transform.0.weight", "cls.predictions.transform.dense.weight"),
    Rename("mlm_transform.0.bias", "cls.predictions.transform.dense.bias"),
    Rename("mlm_transform.2.weight", "cls.predictions.transform.LayerNorm.weight"),
    Rename("mlm_transform.2.bias", "cls.predictions.transform.LayerNorm.bias"),
    Rename("mlm_bias", "cls.predictions.bias"),
    Rename("nsp.weight", "cls.seq_relationship.weight"),
    Rename("nsp.bias", "cls.seq_relationship.bias"),
]
TASK_HEADS = {  # transformers class → its head's tensors
    "BertForSequenceClassification": [Rename("head.weight", "classifier.weight"), Rename("head.bias", "classifier.bias")],
    "BertForTokenClassification": [Rename("head.weight", "classifier.weight"), Rename("head.bias", "classifier.bias")],
    "BertForQuestionAnswering": [Rename("head.weight", "qa_outputs.weight"), Rename("head.bias", "qa_outputs.bias")],
}


def _hf_tensors(folder: Path) -> dict[str, Tensor]:
    """model.safetensors with TF-era LayerNorm names (gamma, beta) as PyTorch's."""
    return {
        key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): value
        for key, value in read_weights(folder, "").items()
    }


def bert_weights_from_hf(folder: Path, layers: int) -> dict[str, Tensor]:
    """A transformers BERT checkpoint (BertModel or Bert*For*, safetensors) renamed to :class:`Bert`'s
    names; query, key and value fuse into one projection. The pooler is left out where the checkpoint
    has none (BertForTokenClassification, BertForQuestionAnswering)."""
    hf = {key.removeprefix("bert."): value for key, value in _hf_tensors(folder).items()}
    try:
        return from_hf(hf, bert_renames(layers) + (POOLER if "pooler.dense.weight" in hf else []))
    except KeyError as e:
        raise UsageError(f"{folder / 'model.safetensors'} is not a transformers BERT checkpoint (no tensor {e})") from None


def bert_head_from_hf(folder: Path, heads: list[Rename]) -> dict[str, Tensor] | None:
    """The tensors of a head (PRETRAINING_HEADS or one of TASK_HEADS) in a transformers BERT
    checkpoint, in our names; None when the checkpoint lacks them."""
    try:
        return from_hf(_hf_tensors(folder), heads)
    except KeyError:
        return None


def bert_weights_to_hf(weights: dict[str, Tensor], layers: int, heads: list[Rename], pooler: bool = True) -> dict[str, Tensor]:
    """A tfkit BERT model's tensors (``bert.*`` and a head's) as a transformers Bert*For* checkpoint's,
    with the pooler or without."""
    encoder = {key.removeprefix("bert."): value for key, value in weights.items() if key.startswith("bert.")}
    hf = {f"bert.{key}": value for key, value in to_hf(encoder, bert_renames(layers) + (POOLER if pooler else [])).items()}
    return {**hf, **to_hf(weights, heads)}
