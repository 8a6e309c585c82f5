"""What both BERT recipes share: the tokenizer in the run directory, encoding text pairs, and the
input that inspect-attention looks at."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tfkit.errors import UsageError
from tfkit.inspect import draw_heads
from tfkit.recipe import AttentionExample, TokenizerRecipe
from tfkit.recipes.bert.tokens import pair_ids

class BertRecipe(TokenizerRecipe):
    """What both BERT recipes share: the tokenizer in the run directory and encoding text pairs."""

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, a: str, b: str | None = None) -> tuple[list[int], list[int]]:
        (first,) = self.token_ids([a])
        second = self.token_ids([b])[0] if b is not None else None
        cls, sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        return pair_ids(first, second, self.config["data"]["max_length"], cls, sep)

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

        return AttentionExample(
            run=lambda: model.bert(token_ids, segment_ids),
            tokens={"tokens": tokens},
            axes=lambda name: ("tokens", "tokens"),
            draw=draw,
            meta={"segments": segments},
        )
