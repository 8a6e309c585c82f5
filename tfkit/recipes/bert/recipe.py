"""What both BERT recipes share: the tokenizer in the run directory, encoding text pairs, and the
input that inspect-attention looks at."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from torch import nn

from tfkit.data import VOCAB_SAMPLE, choose_vocab_size, length_limit
from tfkit.errors import UsageError
from tfkit.hf import write_tokenizer
from tfkit.inspect import draw_heads
from tfkit.recipe import AttentionExample, TokenizerRecipe, Vocabulary
from tfkit.recipes.bert.data import PAD, SPECIALS, pair_ids, train_wordpiece


class BertRecipe(TokenizerRecipe):
    """What both BERT recipes share: the tokenizer in the run directory and encoding text pairs."""

    def imitate_builtin_data(self) -> None:
        self.settle_builtin()
        self.tokenizer = Vocabulary(self.BUILTIN_SIZES["data.vocab_size"])

    def settle_vocabulary(self, texts: Iterable[str], total: int) -> None:
        """data.vocab_size when auto, measured on the WordPiece of the first VOCAB_SAMPLE ``texts`` of ``total``."""

        def infer() -> tuple[int, str]:
            sample = list(itertools.islice(texts, VOCAB_SAMPLE))
            return choose_vocab_size(sample, lambda sample, size: train_wordpiece(sample, size, SPECIALS), total)

        self.settle("data.vocab_size", infer)

    def settle_length(self, lengths: Callable[[], Iterable[int]]) -> None:
        """data.max_length when auto: a high percentile of ``lengths()`` (with [CLS] and [SEP]), at most model.max_positions."""

        def infer() -> tuple[int, str]:
            limit, why = length_limit(lengths())
            positions = self.config["model"]["max_positions"]
            return (limit, why) if limit <= positions else (positions, f"{why}; capped at model.max_positions {positions}")

        self.settle("data.max_length", infer)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, a: str, b: str | None = None) -> tuple[list[int], list[int]]:
        (first,) = self.token_ids([a])
        second = self.token_ids([b])[0] if b is not None else None
        cls, sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        return pair_ids(first, second, self.config["data"]["max_length"], cls, sep)

    def onnx_example(self, batch: int, length: int) -> dict[str, torch.Tensor]:
        """Token and segment ids as the graphs take them: random ordinary tokens, a second segment, and
        padding at the end of the last row."""
        generator = torch.Generator().manual_seed(batch * 1000 + length)
        ids = torch.randint(len(SPECIALS), self.tokenizer.get_vocab_size(), (batch, length), generator=generator)
        ids[-1, length - length // 3 :] = PAD
        segments = (torch.arange(length) >= length // 2).long().expand(batch, length).clone()
        return {"token_ids": ids, "segment_ids": segments}

    def onnx_processing(self, out: Path) -> dict[str, Any]:
        self.write_hf_tokenizer(out)
        return {
            "tokenizer": "tokenizer.json",
            "max_length": self.config["data"]["max_length"],
            "inputs": "token_ids from tokenizer.json ([CLS] A [SEP], or [CLS] A [SEP] B [SEP]), segment_ids 0 for A and 1 for B, "
            "padded with [PAD] (id 0), which no position attends to",
        }

    def write_hf_tokenizer(self, out: Path) -> None:
        """The run's WordPiece as ``AutoTokenizer`` loads it: tfkit adds [CLS] and [SEP] itself, a
        transformers tokenizer through its post-processor, with the second segment's type ids."""
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        specials = [(t, self.tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
        tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=specials
        )
        write_tokenizer(
            out,
            tokenizer,
            self.config["model"]["max_positions"],
            {
                "pad_token": "[PAD]",
                "unk_token": "[UNK]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "mask_token": "[MASK]",
                "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            },
        )

    def attention_example(self, model: nn.Module, text: str) -> AttentionExample:
        """A sentence, or two separated by a tab or ' ||| ', as BERT sees them."""
        parts = re.split(r"\t| \|\|\| ", text.strip(), maxsplit=1)
        if not parts[0]:
            raise UsageError("the input text is empty")
        ids, segments = self.encode(parts[0], parts[1] if len(parts) > 1 else None)
        device = next(model.parameters()).device
        token_ids = torch.tensor([ids], device=device)
        segment_ids = torch.tensor([segments], device=device)
        tokens = [self.tokenizer.id_to_token(i) for i in ids]
        boundary = segments.index(1) if 1 in segments else None
        model.eval()

        def draw(weights: dict, out_dir: Path) -> None:
            for name, w in weights.items():
                draw_heads(w, tokens, tokens, name, out_dir / f"{name}.png", boundary=boundary)

        def page(weights: dict) -> dict:
            return {
                "panels": self.page_panels(model, ids, segments),
                "boundaries": {} if boundary is None else {"tokens": boundary},
            }

        return AttentionExample(
            run=lambda: model.bert(token_ids, segment_ids),
            tokens={"tokens": tokens},
            axes=lambda name: ("tokens", "tokens"),
            draw=draw,
            meta={"segments": segments},
            page=page,
        )

    def page_panels(self, model: nn.Module, ids: list[int], segments: list[int]) -> list[dict]:
        """report.html's views of what the model makes of the input beyond attention (see
        :attr:`tfkit.recipe.AttentionExample.page`); a classifier's encoder alone shows none."""
        return []
