"""BERT pretraining: the user's text as sentence tables, masked LM (15% of the ordinary tokens chosen:
80% become [MASK], 10% a random token, 10% stay) and next-sentence pairs (B follows A half the time),
and the ``bert-pretrain`` recipe."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit import config as configs
from tfkit.data import (
    as_evaluation,
    derive_seed,
    encode_once,
    length_buckets,
    load_splits,
    pad_rows,
    read_lines,
    require_columns,
)
from tfkit.errors import UsageError
from tfkit.hf import write_folder
from tfkit.onnx import Graph
from tfkit.progress import Preparing
from tfkit.recipe import Batch, Loss
from tfkit.recipes.bert.data import (
    MASK,
    PAD,
    SPECIALS,
    check_specials,
    load_tokenizer,
    pair_ids,
    pretraining_corpus,
    sentences,
    text_folder,
    train_wordpiece,
)
from tfkit.recipes.bert.interop import (
    PRETRAINING_HEADS,
    bert_config_from_hf,
    bert_config_to_hf,
    bert_head_from_hf,
    bert_weights_from_hf,
    bert_weights_to_hf,
    check_representable,
)
from tfkit.recipes.bert.model import BertForPretraining, build_bert
from tfkit.recipes.bert.recipe import BertRecipe
from tfkit.registry import register

IS_NEXT, NOT_NEXT = 0, 1  # the Hugging Face convention for NSP labels
TOKEN_COLUMNS = datasets.Features({"ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32")})


def sentence_rows(rows: datasets.Dataset, column: str, split: str) -> datasets.Dataset:
    """The sentences of a split as rows of ``text`` and ``first`` (the first sentence of a document),
    in an Arrow table (memory-mapped when ``rows`` come from files). Blank rows separate documents;
    without any blank row, each row is a document of sentences."""
    require_columns(rows, split, [column], "data.text_column")
    kind = getattr(rows.features[column], "dtype", type(rows.features[column]).__name__)
    if kind not in ("string", "large_string"):
        raise UsageError(f"the {split} data's column '{column}' holds {kind}, not text (set data.text_column)")
    blank_rows = any(  # read in blocks: a corpus need not fit in memory
        pc.any(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(block[column]), ""), True)).as_py()
        for block in rows.with_format("arrow").iter(batch_size=100_000)
    )

    def split_rows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"text": [], "first": []}
        after_blank = indices[0] == 0 or not (rows[indices[0] - 1][column] or "").strip()
        for text in batch[column]:
            text = (text or "").strip()
            if blank_rows:
                if text:
                    out["text"].append(text)
                    out["first"].append(after_blank)
                after_blank = not text
            else:
                found = sentences(text) or [text]
                out["text"] += found
                out["first"] += [True] + [False] * (len(found) - 1)
        return out

    columns = datasets.Features({"text": datasets.Value("string"), "first": datasets.Value("bool")})
    return encode_once(rows, split_rows, {"column": column, "blank_rows": blank_rows}, columns)


class TableText:
    """The sentences of some documents of a :func:`sentence_rows` table, read a block at a time on
    every iteration (training WordPiece reads them twice)."""

    def __init__(self, table: datasets.Dataset, documents: np.ndarray):
        edges = np.zeros(len(table) + 1, dtype=np.int64)
        np.add.at(edges, documents[:, 0], 1)
        np.add.at(edges, documents[:, 1], -1)
        self.table, self.chosen = table, np.cumsum(edges)[:-1] > 0
        self.shown: Preparing | None = None  # where the sentences read are counted, while one is

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.table), 10_000):
            texts = self.table[start : start + 10_000]["text"]
            chosen = self.chosen[start : start + 10_000]
            yield from (text for text, chosen in zip(texts, chosen) if chosen)
            if self.shown is not None:
                self.shown.advance(int(chosen.sum()))


def document_bounds(table: datasets.Dataset) -> np.ndarray:
    """(documents, 2): the [start, end) sentence rows of each document of a :func:`sentence_rows` table."""
    starts = np.flatnonzero(table.data.column("first").to_numpy(zero_copy_only=False))
    return np.stack([starts, np.append(starts[1:], len(table))], axis=1)


def mask_tokens(
    token_ids: Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose round(prob·n) of each row's n ordinary tokens (at least one); of those, 80% become [MASK],
    10% a random ordinary token, 10% stay. Returns (masked ids, flat positions, original ids there)."""
    ordinary = token_ids >= len(SPECIALS)
    counts = (ordinary.sum(1).float() * prob).round().clamp(min=1).long()
    scores = torch.rand(token_ids.shape, generator=generator).masked_fill(~ordinary, 2.0)  # specials sort last
    ranks = scores.argsort(1).argsort(1)
    chosen = (ranks < counts[:, None]) & ordinary
    positions = chosen.flatten().nonzero().squeeze(1)
    labels = token_ids.flatten()[positions]
    action = torch.rand(len(positions), generator=generator)
    replacement = torch.where(
        action < 0.8,
        torch.full_like(labels, MASK),
        torch.where(action < 0.9, torch.randint(len(SPECIALS), vocab_size, labels.shape, generator=generator), labels),
    )
    masked = token_ids.flatten().clone()
    masked[positions] = replacement
    return masked.view_as(token_ids), positions, labels


def nsp_pairs(documents: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each sentence with a successor in its document: sentence numbers A and B and the label, with
    B the true next sentence half the time, otherwise a random sentence of another document.
    ``documents`` holds each document's [start, end) sentence numbers."""
    starts, sizes = documents[:, 0], documents[:, 1] - documents[:, 0]
    per_document = np.maximum(sizes - 1, 0)
    document = np.repeat(np.arange(len(documents)), per_document)
    first_pair = np.cumsum(per_document) - per_document
    a = starts[document] + np.arange(len(document)) - first_pair[document]
    b, label = a + 1, np.full(len(a), IS_NEXT)
    if len(documents) >= 2:
        swapped = rng.random(len(a)) >= 0.5
        other = rng.integers(0, len(documents) - 1, int(swapped.sum()))
        other += other >= document[swapped]  # any document but this one
        b[swapped] = starts[other] + rng.integers(0, sizes[other])
        label[swapped] = NOT_NEXT
    return a, b, label


class EveryPosition(nn.Module):
    """BertForPretraining with its masked-LM logits at every position, as a graph without the flat
    positions input (B, T, V)."""

    def __init__(self, model: BertForPretraining):
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(token_ids.numel(), device=token_ids.device)
        mlm, nsp = self.model(token_ids, segment_ids, positions)
        return mlm.view(*token_ids.shape, -1), nsp


@register("recipe", "bert-pretrain")
class BertPretrain(BertRecipe):
    """BERT pretraining: masked LM (15%, 80/10/10) and next-sentence prediction, WordPiece."""

    config_file = "bert-pretrain.yaml"
    ranges = configs.ranges((*configs.PROBABILITY, ("mask_prob",)), (*configs.FRACTION, ("held_out",)))
    BUILTIN_SIZES = {"data.vocab_size": 4000, "data.max_length": 64, "train.steps": 3000}

    def prepare(self, run_dir: Path | None = None) -> None:
        """Sentences and their token ids live in Arrow tables (memory-mapped when read from files);
        memory holds sentence lengths, document bounds and the held-out batches."""
        data, seed = self.config["data"], self.config["seed"]
        folder = text_folder(Path(data["name"]).expanduser(), data["text_column"]) if data["name"] != "builtin" else None
        if folder is not None:
            splits = as_evaluation(folder) or folder
        else:
            splits = load_splits(data["name"], lambda: pretraining_corpus(seed), seed, hub_config=data["hub_config"], carve=False)
        texts = {split: sentence_rows(rows, data["text_column"], split) for split, rows in splits.items()}
        self.documents = {split: document_bounds(table) for split, table in texts.items()}
        for split in self._carve(seed):
            texts[split] = texts["train"]
        if run_dir is not None:
            self.load(run_dir)
        elif self.config["init"]:
            self.tokenizer = load_tokenizer(Path(self.config["init"]))
            check_specials(self.tokenizer, self.config["init"])
        else:
            training = TableText(texts["train"], self.documents["train"])
            self.settle_vocabulary(training, int(training.chosen.sum()))
            # WordPiece reads the text twice: once for its characters, once to learn
            with Preparing(
                "training the tokenizer on the train sentences", total=2 * int(training.chosen.sum()), unit="sentences"
            ) as shown:
                training.shown = shown
                self.tokenizer = train_wordpiece(training, data["vocab_size"], SPECIALS)
            training.shown = None
        self.ids, self.lengths = {}, {}
        encoded: dict[int, datasets.Dataset] = {}  # carved splits share the training table
        for split, table in texts.items():
            if id(table) not in encoded:
                with Preparing(f"encoding the {split} sentences", total=len(table), unit="sentences") as shown:
                    encode = lambda batch, indices: self._encode(batch, indices, shown)  # noqa: E731
                    encoded[id(table)] = encode_once(table, encode, {"tokenizer": self.tokenizer.to_str()}, TOKEN_COLUMNS)
            self.ids[split] = encoded[id(table)]
            self.lengths[split] = self.ids[split].data.column("length").to_numpy()
        a, b, _ = nsp_pairs(self.documents["train"], np.random.default_rng(seed))
        self.settle_length(lambda: self.lengths["train"][a] + self.lengths["train"][b] + 3)
        self.settle_steps(len(a))
        # held-out pairs and masks are drawn once, so every evaluation scores the same questions
        self.held_out = {split: list(self._batches(split, seed + 7919, shuffle=False)) for split in ("validation", "test")}

    def _encode(self, batch: dict[str, list], indices: list[int], shown: Preparing) -> dict[str, list]:
        ids = self.token_ids(batch["text"])
        shown.advance(len(ids))
        return {"ids": ids, "length": [len(row) for row in ids]}

    def _carve(self, seed: int) -> list[str]:
        """Documents of the training split held out as the validation and test splits the source
        lacks; returns the names of the splits carved."""
        train = self.documents["train"]
        if ((train[:, 1] - train[:, 0]) >= 2).sum() < 3:
            raise UsageError("the training text needs documents of two or more sentences (blank lines between documents)")
        missing = [s for s in ("validation", "test") if s not in self.documents]
        if missing:
            order = np.random.default_rng(seed).permutation(len(train))
            size = max(1, round(self.config["data"]["held_out"] * len(train)))
            for i, split in enumerate(missing):
                self.documents[split] = train[np.sort(order[i * size : (i + 1) * size])]
            self.documents["train"] = train[np.sort(order[len(missing) * size :])]
        return missing

    def build_model(self) -> nn.Module:
        m = self.config["model"]
        return BertForPretraining(build_bert(self.tokenizer.get_vocab_size(), self.config), m["norm_eps"])

    def _batches(self, split: str, seed: int, shuffle: bool = True) -> Iterator[Batch]:
        """Sentence-pair batches of ``split`` with their masks, drawn from ``seed``; with ``shuffle``,
        pairs of similar length share a batch (less padding) and batches come in random order."""
        cfg = self.config
        generator = torch.Generator().manual_seed(seed)
        a, b, labels = nsp_pairs(self.documents[split], np.random.default_rng(seed))
        size, vocab, max_length = cfg["train"]["batch_size"], self.tokenizer.get_vocab_size(), cfg["data"]["max_length"]
        if shuffle:
            lengths = self.lengths[split]
            chunks = length_buckets(lengths[a] + lengths[b], size, generator, pool=50)
        else:
            chunks = [range(start, min(start + size, len(a))) for start in range(0, len(a), size)]
        table = self.ids[split]
        for chunk in chunks:
            pairs = list(chunk)
            rows = table[[*a[pairs].tolist(), *b[pairs].tolist()]]["ids"]
            encoded = [pair_ids(first, second, max_length) for first, second in zip(rows[: len(pairs)], rows[len(pairs) :])]
            token_ids = pad_rows([ids for ids, _ in encoded], PAD)
            masked, positions, mlm_labels = mask_tokens(token_ids, vocab, generator, cfg["data"]["mask_prob"])
            yield {
                "token_ids": masked,
                "segment_ids": pad_rows([seg for _, seg in encoded], 0),
                "positions": positions,
                "mlm_labels": mlm_labels,
                "nsp_labels": torch.from_numpy(labels[pairs]),
            }

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        # new pairs and new masks every epoch (dynamic masking), fixed by seed and epoch
        yield from self._batches("train", derive_seed(self.config["seed"], epoch))

    def shard(self, batch: Batch, rank: int, world: int) -> Batch:
        """Rows as usual; the masked positions (flat over B·T) and their labels follow their rows."""
        rows, length = len(batch["token_ids"]), batch["token_ids"].size(1)
        bounds = torch.arange(rows).tensor_split(world)[rank]
        first, end = (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (0, 0)
        keep = (batch["positions"] >= first * length) & (batch["positions"] < end * length)
        return {
            **super().shard({k: batch[k] for k in ("token_ids", "segment_ids", "nsp_labels")}, rank, world),
            "positions": batch["positions"][keep] - first * length,
            "mlm_labels": batch["mlm_labels"][keep],
        }

    def loss(self, model: nn.Module, batch: Batch) -> Loss:
        """The mean MLM loss over masked tokens plus the mean NSP loss over pairs."""
        mlm_logits, nsp_logits = model(batch["token_ids"], batch["segment_ids"], batch["positions"])
        mlm = F.cross_entropy(mlm_logits.float(), batch["mlm_labels"], reduction="sum")
        nsp = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"], reduction="sum")
        return Loss([(mlm, len(mlm_logits)), (nsp, len(nsp_logits))], int((batch["token_ids"] != PAD).sum()))

    @torch.no_grad()
    def eval_outputs(
        self, model: nn.Module, split: str, rank: int = 0, world: int = 1
    ) -> dict[int, tuple[float, int, int, int, int]]:
        """Per held-out batch: MLM loss summed, MLM right and total, NSP right and total."""
        model.eval()
        device = next(model.parameters()).device
        batches, out = self.held_out[split], {}
        for number in range(rank, len(batches), world):
            batch = {k: v.to(device) for k, v in batches[number].items()}
            mlm_logits, nsp_logits = model(batch["token_ids"], batch["segment_ids"], batch["positions"])
            out[number] = (
                F.cross_entropy(mlm_logits.float(), batch["mlm_labels"], reduction="sum").item(),
                int((mlm_logits.argmax(-1) == batch["mlm_labels"]).sum()),
                len(batch["mlm_labels"]),
                int((nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()),
                len(batch["nsp_labels"]),
            )
        return out

    def score(self, split: str, outputs: list[tuple[float, int, int, int, int]]) -> dict[str, float]:
        mlm_loss, mlm_correct, mlm_total, nsp_correct, nsp_total = (
            (sum(column) for column in zip(*outputs)) if outputs else (0,) * 5
        )
        return {
            "mlm_accuracy": 100.0 * mlm_correct / max(1, mlm_total),
            "mlm_loss": mlm_loss / max(1, mlm_total),
            "nsp_accuracy": 100.0 * nsp_correct / max(1, nsp_total),
        }

    @torch.no_grad()
    def predict_file(self, model: nn.Module, path: Path, out: TextIO, top_k: int | None = None) -> None:
        """For each line with [MASK] (a pair separated by a tab): the top-k fillings of each mask as
        tab-separated "token probability" fields, masks separated by a "|" field."""
        top_k = top_k or self.config["predict"]["top_k"]
        model.eval()
        for number, line in enumerate(read_lines(path), 1):
            parts = line.split("\t", 1)
            ids, segments = self.encode(parts[0], parts[1] if len(parts) > 1 else None)
            positions = [i for i, t in enumerate(ids) if t == MASK]
            if not positions:
                print(f"warning: {path}:{number}: no [MASK] in the line, its output is left empty", file=sys.stderr)
                out.write("\n")
                continue
            fillings = [
                "\t".join(f"{token} {p:.3f}" for token, p in mask)
                for mask in self.fill_masks(model, ids, segments, positions, top_k)
            ]
            out.write("\t|\t".join(fillings) + "\n")

    @torch.no_grad()
    def fill_masks(
        self, model: nn.Module, ids: list[int], segments: list[int], positions: list[int], top_k: int
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` likeliest (token, probability) fillings of each masked position."""
        device = next(model.parameters()).device
        mlm_logits, _ = model(
            torch.tensor([ids], device=device), torch.tensor([segments], device=device), torch.tensor(positions, device=device)
        )
        probs, tokens = mlm_logits.float().softmax(-1).topk(top_k, dim=-1)
        return [
            [(self.tokenizer.id_to_token(t), p) for p, t in zip(row_p.tolist(), row_t.tolist())]
            for row_p, row_t in zip(probs, tokens)
        ]

    def page_panels(self, model: nn.Module, ids: list[int], segments: list[int]) -> list[dict]:
        """Fill-mask predictions when the input has [MASK]."""
        positions = [i for i, t in enumerate(ids) if t == MASK]
        if not positions:
            return []
        fillings = self.fill_masks(model, ids, segments, positions, self.config["predict"]["top_k"])
        rows = [
            [position, rank + 1, token, round(p, 4)]
            for position, mask in zip(positions, fillings)
            for rank, (token, p) in enumerate(mask)
        ]
        return [
            {
                "kind": "table",
                "title": "fill-mask: the likeliest tokens at each [MASK]",
                "columns": ["position", "rank", "token", "probability"],
                "rows": rows,
            }
        ]

    # -- starting from a transformers BERT, and going back to one ---------------------------------
    @classmethod
    def pretrained_config(cls, path: Path) -> dict[str, Any]:
        model = bert_config_from_hf(path)
        if model["activation"] != "gelu":  # our masked-LM head's transform is GELU whatever the encoder's activation
            raise UsageError(f"{path}: only BERTs with GELU can be pretrained further (its masked-LM head would differ)")
        return {"model": model}

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        """The encoder, and the masked-LM and next-sentence heads where the folder has them
        (BertForPreTraining); from a BertModel they start fresh."""
        check_representable(self.config["model"])  # --set after --init may have asked for another model
        weights = {f"bert.{k}": v for k, v in bert_weights_from_hf(path, len(model.bert.encoder.layers)).items()}
        heads = bert_head_from_hf(path, PRETRAINING_HEADS)
        if heads is None:
            print(f"note: {path} has no pretraining heads; they start fresh", file=sys.stderr)
        try:
            missing, _ = model.load_state_dict({**weights, **(heads or {})}, strict=False)
        except RuntimeError as e:  # sizes changed with --set after --init
            raise UsageError(
                f"the weights in {path} do not fit this config's model ({str(e).splitlines()[-1].strip()})"
            ) from None
        if "bert.pooler.weight" in missing:
            raise UsageError(f"{path} has no pooler, which next-sentence prediction needs (a BertModel or BertForPreTraining is)")

    def onnx_graphs(self, model: nn.Module) -> list[Graph]:
        """(B, T) token and segment ids → masked-LM logits at every position (B, T, V) and NSP logits (B, 2)."""
        axes = {"token_ids": {0: "batch", 1: "length"}, "segment_ids": {0: "batch", 1: "length"}}
        return [
            Graph(
                "model",
                EveryPosition(model),
                self.onnx_example,
                ["mlm_logits", "nsp_logits"],
                axes,
                limits={"length": {"max": self.config["model"]["max_positions"]}},
            )
        ]

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        return {
            **super().onnx_processing(out),
            "outputs": "mlm_logits (B, T, V): a filling for each [MASK] position; "
            "nsp_logits (B, 2): 0 is next sentence, 1 is not",
        }

    def export_hf(self, model: nn.Module, out: Path) -> None:
        m = self.config["model"]
        if m["activation"] != "gelu":
            raise UsageError(
                f"model.activation '{m['activation']}': BertForPreTraining's masked-LM head would use it where ours uses GELU"
            )
        config = {**bert_config_to_hf(m, self.tokenizer.get_vocab_size()), "architectures": ["BertForPreTraining"]}
        write_folder(out, config, bert_weights_to_hf(model.state_dict(), len(model.bert.encoder.layers), PRETRAINING_HEADS))
        self.write_hf_tokenizer(out)
