"""Look inside attention: capture every head's weights, save them, draw them, summarise them.

Inside :func:`capture_attention`, every :class:`ScaledDotProductAttention` takes its explicit path and
a hook on its probe stores the weights under the name of the attention layer that owns it
(``encoder.layers.0.self_attn``), as (batch, heads, query, key). Outputs stay the same.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from tfkit.errors import TfkitError
from tfkit.nn.attention import ScaledDotProductAttention
from tfkit.recipe import AttentionExample


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}
    kernels = [(name, m) for name, m in model.named_modules() if isinstance(m, ScaledDotProductAttention)]
    handles = []
    for name, kernel in kernels:
        owner = name.removesuffix(".attend")

        def keep(module, inputs, output, owner=owner):
            captured[owner] = output.detach().float().cpu()

        kernel.explicit = True
        handles.append(kernel.probe.register_forward_hook(keep))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for _, kernel in kernels:
            kernel.explicit = False


def inspect(model: nn.Module, example: AttentionExample, out_dir: Path) -> dict[str, np.ndarray]:
    """Run the example, write attention.npz, tokens.json and one PNG grid of heads per layer."""
    with torch.no_grad(), capture_attention(model) as captured:
        example.run()
    if not captured:
        raise TfkitError("the model ran but no attention layer recorded weights (does it use tfkit.nn attention?)")
    weights = {name: w[0].numpy() for name, w in captured.items()}  # drop the batch of one: (H, Tq, Tk)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "attention.npz", **weights)
    modules = {name: list(example.axes(name)) for name in weights}
    (out_dir / "tokens.json").write_text(json.dumps({"axes": example.tokens, "modules": modules}, indent=1, ensure_ascii=False), encoding="utf-8")
    for name, w in weights.items():
        draw_heads(w, *(example.tokens[axis] for axis in example.axes(name)), title=name, path=out_dir / f"{name}.png")
    return weights


def draw_heads(weights: np.ndarray, queries: list[str], keys: list[str], title: str, path: Path) -> None:
    """One heatmap per head, queries down and keys across, tokens as tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = weights.shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    cell = max(2.5, 0.28 * max(len(queries), len(keys)))
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.6), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
        ax.set_yticks(range(len(queries)), queries, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def head_summary(weights: np.ndarray, keys: list[str]) -> list[tuple[int, float, str, float]]:
    """Per head: mean entropy of the attention rows (nats) and the key that receives most weight."""
    rows = []
    for h, w in enumerate(weights):
        entropy = float(-(w * np.log(np.clip(w, 1e-12, None))).sum(-1).mean())
        received = w.mean(0)
        top = int(received.argmax())
        rows.append((h, entropy, keys[top], float(received[top])))
    return rows
