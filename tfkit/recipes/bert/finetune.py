"""BERT fine-tuning: the ``bert-finetune`` recipe, a task head on a pretrained encoder (a bert-pretrain
run or a Hugging Face BERT folder) for classify, classify-pair, tag or qa."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch
from torch import Tensor, nn

from tfkit import config as configs
from tfkit import run as runs
from tfkit.data import SPLITS, seeded_generator
from tfkit.errors import UsageError
from tfkit.hf import labels_config, read_config, write_folder
from tfkit.onnx import Graph
from tfkit.recipe import Batch, Loss, batch_ranges
from tfkit.recipes.bert.data import PAD, SPECIALS, check_specials, load_tokenizer, train_wordpiece
from tfkit.recipes.bert.interop import (
    TASK_HEADS,
    bert_config_from_hf,
    bert_config_to_hf,
    bert_head_from_hf,
    bert_weights_from_hf,
    bert_weights_to_hf,
    check_representable,
)
from tfkit.recipes.bert.model import BertWithHead, build_bert
from tfkit.recipes.bert.qa import QuestionAnswering
from tfkit.recipes.bert.recipe import BertRecipe
from tfkit.recipes.bert.tasks import Classify, ClassifyPair, Tag
from tfkit.registry import register

TASKS = {"classify": Classify, "classify-pair": ClassifyPair, "tag": Tag, "qa": QuestionAnswering}


@register("recipe", "bert-finetune")
class BertFinetune(BertRecipe):
    """BERT fine-tuning (--set task=classify|classify-pair|tag|qa) from a pretrain run or Hugging Face BERT."""

    config_file = "bert-finetune.yaml"
    ranges = configs.ranges((*configs.AT_LEAST_1, ("max_answer_length",)), (*configs.AT_LEAST_0, ("doc_stride",)))
    BUILTIN_SIZES = {"data.vocab_size": 4000, "data.max_length": 128, "train.steps": 600}
    labels: list[str]  # the names of the head's outputs: classes, tags, or start and end

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        if config["task"] not in TASKS:
            raise UsageError(f"unknown task '{config['task']}' (valid: {', '.join(TASKS)})")
        self.task = TASKS[config["task"]](self)

    def prepare(self, run_dir: Path | None = None) -> None:
        rows, labels = self.task.read(self.config["seed"])
        if run_dir is not None:
            self.load(run_dir)
        else:
            self.labels = labels
            if self.config["init"]:
                self.tokenizer = load_tokenizer(Path(self.config["init"]))
            else:
                texts = self.task.texts(rows["train"])
                self.settle_vocabulary(texts, len(texts))
                self.tokenizer = train_wordpiece(texts, self.config["data"]["vocab_size"], SPECIALS)
        check_specials(self.tokenizer, self.config["init"] or "this run")
        self.settle_length(lambda: self._lengths(rows["train"]))
        self.settle_steps(len(rows["train"]))
        self.rows = rows
        self.examples = {split: self.task.encode(rows[split], split) for split in SPLITS}

    def _lengths(self, rows: list[Any]) -> list[int]:
        """The encoded lengths of up to 10,000 of ``rows``, evenly spaced, as long as the model allows."""
        data = self.config["data"]
        data["max_length"] = self.config["model"]["max_positions"]
        try:
            return [len(example[0]) for example in self.task.encode(rows[:: max(1, len(rows) // 10_000)], "train")]
        finally:
            data["max_length"] = "auto"

    def imitate_builtin_data(self) -> None:
        super().imitate_builtin_data()
        self.labels = [str(i) for i in range(self.task.builtin_labels)]

    def save(self, run_dir: Path) -> None:
        super().save(run_dir)
        runs.write_json(run_dir, "labels.json", self.labels)

    def load(self, run_dir: Path) -> None:
        super().load(run_dir)
        self.labels = runs.read_json(run_dir, "labels.json")

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        bert = build_bert(self.tokenizer.get_vocab_size(), self.config)
        return BertWithHead(bert, len(self.labels), m["dropout"], m["norm_eps"], per_token=self.task.per_token)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        examples, size = self.examples["train"], self.config["train"]["batch_size"]
        order = torch.randperm(len(examples), generator=seeded_generator(self.config["seed"], epoch))
        for start in range(0, len(order), size):
            yield self.task.batch([examples[i] for i in order[start : start + size].tolist()])

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        logits = model(batch["token_ids"], batch["segment_ids"])
        return Loss(self.task.loss(logits.float(), batch), int((batch["token_ids"] != PAD).sum()))

    @torch.no_grad()
    def outputs(self, model: nn.Module, examples: list, rank: int = 0, world: int = 1) -> Iterator[tuple[range, Tensor]]:
        """(places of a batch of examples, their logits on the CPU), predict.batch_size examples at a
        time; process ``rank`` of ``world`` gets its share of the batches (:func:`batch_ranges`)."""
        model.eval()
        device = next(model.parameters()).device
        for places in batch_ranges(len(examples), self.config["predict"]["batch_size"], rank, world):
            batch = self.task.batch(examples[places.start : places.stop])
            yield places, model(batch["token_ids"].to(device), batch["segment_ids"].to(device)).float().cpu()

    def eval_outputs(self, model: nn.Module, split: str, rank: int = 0, world: int = 1) -> dict[int, Any]:
        return self.task.eval_outputs(model, split, rank, world)

    def score(self, split: str, outputs: list[Any]) -> dict[str, float]:
        return self.task.score(split, outputs)

    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None = None) -> None:
        self.task.predict_file(model, path, out, top_k)

    # -- starting points ----------------------------------------------------------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        if (path / runs.CONFIG).is_file():  # a tfkit bert-pretrain run
            config = runs.read_config(path)
            if config.get("recipe") != "bert-pretrain":
                raise UsageError(f"{path} is a {config.get('recipe')} run, not a bert-pretrain one")
            return {"model": config["model"]}
        if (path / "config.json").is_file():
            return {"model": bert_config_from_hf(path)}
        raise UsageError(f"{path} is neither a bert-pretrain run directory nor a Hugging Face BERT folder")

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        if (path / runs.CONFIG).is_file():
            checkpoint = runs.pick_checkpoint(path, runs.read_config(path))
            weights = {
                k.removeprefix("bert."): v
                for k, v in runs.read_weights(checkpoint / runs.WEIGHTS).items()
                if k.startswith("bert.")
            }
        else:
            check_representable(self.config["model"])  # --set after --init may have asked for another model
            weights = bert_weights_from_hf(path, len(model.bert.encoder.layers))
        try:
            missing, unexpected = model.bert.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(
                f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})"
            ) from None
        if set(missing) - {"pooler.weight", "pooler.bias"}:  # a per-token task model has no pooler: ours starts fresh
            raise UsageError(f"the weights in {path} lack {len(missing)} of the encoder's tensors, e.g. {missing[0]}")
        if unexpected:  # e.g. learned positions that model.position, set after --init, leaves out
            raise UsageError(
                f"the weights in {path} hold {len(unexpected)} tensors this config's encoder lacks, e.g. {unexpected[0]} "
                f"(keep the pretrained model's model.* keys)"
            )
        if (path / "config.json").is_file():
            self._load_hf_head(model, path)

    def _load_hf_head(self, model: nn.Module, path: Path) -> None:
        """A transformers task model's head comes along when it is this task's, for the same labels in
        the same order (a folder ``tfkit export`` wrote): the run then starts from the same outputs."""
        hf = read_config(path, "bert", "BERT")
        names = [name for _, name in sorted((hf.get("id2label") or {}).items(), key=lambda item: int(item[0]))]
        head = (
            bert_head_from_hf(path, TASK_HEADS[self.task.hf_class]) if self.task.hf_class in hf.get("architectures", []) else None
        )
        if head is None or names != self.labels or head["head.weight"].shape != model.head.weight.shape:
            return
        model.head.load_state_dict({key.removeprefix("head."): value for key, value in head.items()})
        print(f"note: the {self.task.hf_class} head of {path} comes along (the same {len(names)} labels)", file=sys.stderr)

    # -- taking the model elsewhere -----------------------------------------------------------------
    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        """The encoder with its head: (B, T) token and segment ids → logits, (B, labels) or per token (B, T, labels)."""
        axes = {"token_ids": {0: "batch", 1: "length"}, "segment_ids": {0: "batch", 1: "length"}}
        return [
            Graph(
                "model",
                model,
                self.onnx_example,
                ["logits"],
                axes,
                limits={"length": {"max": self.config["model"]["max_positions"]}},
            )
        ]

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        outputs = {
            "classify": "logits (B, labels): softmax for each label's probability",
            "classify-pair": "logits (B, labels): softmax for each label's probability",
            "tag": "logits (B, T, labels): each word's label is read at its first sub-token",
            "qa": "logits (B, T, 2): start and end logits per token; the answer is the context span with the highest "
            "start + end, at most data.max_answer_length tokens",
        }
        data = self.config["data"]
        return {
            **super().onnx_processing(out),
            "task": self.config["task"],
            "labels": self.labels,
            "outputs": outputs[self.config["task"]],
            **(
                {"doc_stride": data["doc_stride"], "max_answer_length": data["max_answer_length"]}
                if self.config["task"] == "qa"
                else {}
            ),
        }

    def export_hf(self, model: nn.Module, out: Path) -> None:
        config = {
            **bert_config_to_hf(self.config["model"], self.tokenizer.get_vocab_size()),
            "architectures": [self.task.hf_class],
            **labels_config(self.labels),
        }
        weights = bert_weights_to_hf(
            model.state_dict(), len(model.bert.encoder.layers), TASK_HEADS[self.task.hf_class], pooler=not self.task.per_token
        )
        write_folder(out, config, weights)
        self.write_hf_tokenizer(out)
