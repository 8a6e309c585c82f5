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
from tfkit.run import make_dir


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
    make_dir(out_dir)
    np.savez_compressed(out_dir / "attention.npz", **weights)
    modules = {name: list(example.axes(name)) for name in weights}
    described = {"axes": example.tokens, "modules": modules, **example.meta}
    (out_dir / "tokens.json").write_text(json.dumps(described, indent=1, ensure_ascii=False), encoding="utf-8")
    if example.draw is not None:
        example.draw(weights, out_dir)
    else:
        for name, w in weights.items():
            draw_heads(w, *(example.tokens[axis] for axis in example.axes(name)), title=name, path=out_dir / f"{name}.png")
    return weights


def attention_rollout(layers: list[np.ndarray]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each input token flows into each output
    token through a stack of self-attention layers, given in order as (heads, T, T) arrays.

    Each layer's head-averaged attention is mixed half-and-half with the identity for the residual
    connection, renormalised, and the layers are multiplied; every row of the result sums to 1.
    """
    rollout = np.eye(layers[0].shape[-1])
    for weights in layers:
        mixed = 0.5 * weights.mean(0) + 0.5 * np.eye(weights.shape[-1])
        rollout = (mixed / mixed.sum(-1, keepdims=True)) @ rollout
    return rollout


def figure_panels(count: int, cell: float, title: str):
    """A figure of ``count`` panels, at most 4 across; unused panels are hidden."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.6), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    fig.suptitle(title)
    return fig, axes.flat[:count]


def save_figure(fig, path: Path) -> None:
    """Lay the figure out, write it as a PNG, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_heads(
    weights: np.ndarray, queries: list[str], keys: list[str], title: str, path: Path, boundary: int | None = None
) -> None:
    """One heatmap per head, queries down and keys across, tokens as tick labels (every n-th of a long
    sequence); ``boundary`` draws lines before that token on both axes (where a second segment starts)."""
    longest = max(len(queries), len(keys))
    step = math.ceil(longest / 40)
    fig, axes = figure_panels(weights.shape[0], min(12.0, max(2.5, 0.28 * longest / step)), title)
    for h, ax in enumerate(axes):
        ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        if boundary is not None:
            ax.axvline(boundary - 0.5, color="white", linewidth=1)
            ax.axhline(boundary - 0.5, color="white", linewidth=1)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(0, len(keys), step), keys[::step], rotation=90, fontsize=7)
        ax.set_yticks(range(0, len(queries), step), queries[::step], fontsize=7)
    save_figure(fig, path)


def draw_overlays(image: np.ndarray, maps: list[tuple[str, np.ndarray]], title: str, path: Path) -> None:
    """Each (label, h×w map) stretched over the image (H, W, C in [0, 1]) as a translucent heatmap."""
    fig, axes = figure_panels(len(maps), 2.5, title)
    height, width = image.shape[:2]
    for ax, (label, heat) in zip(axes, maps):
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0)
        ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    save_figure(fig, path)


def head_summary(weights: np.ndarray, keys: list[str]) -> list[tuple[int, float, str, float]]:
    """Per head: mean entropy of the attention rows (nats) and the key that receives most weight."""
    rows = []
    for h, w in enumerate(weights):
        entropy = float(-(w * np.log(np.clip(w, 1e-12, None))).sum(-1).mean())
        received = w.mean(0)
        top = int(received.argmax())
        rows.append((h, entropy, keys[top], float(received[top])))
    return rows


def head_type_scores(weights: np.ndarray, period: int) -> dict[str, list[float]]:
    """Per head of (heads, 2·period, 2·period) causal attention over a sequence of random tokens
    repeated twice: the mean weight on the previous position (previous-token heads), and, over the
    second repeat, on the same token's earlier copy (duplicate-token heads) and on the token that
    followed that copy, which is the one that comes next (induction heads; Olsson et al., 2022)."""
    positions = np.arange(1, weights.shape[-1])
    second = np.arange(period, 2 * period)
    return {
        "previous_token": weights[:, positions, positions - 1].mean(-1).tolist(),
        "duplicate_token": weights[:, second, second - period].mean(-1).tolist(),
        "induction": weights[:, second, second - period + 1].mean(-1).tolist(),
    }


def head_type_cell(scores: dict[str, list[float]], kind: str, head: int, marks: dict[str, float]) -> str:
    """A head's score of one kind, starred where it passes the recipe's mark for that kind."""
    value = scores[kind][head]
    return f"{value:.2f}" + (" *" if kind in marks and value > marks[kind] else "")


def write_head_types(example: AttentionExample, out_dir: Path) -> dict[str, dict[str, list[float]]] | None:
    """The example's head-type scores, written to head_types.json; None where the recipe has none."""
    if example.head_types is None:
        return None
    scores = example.head_types()
    (out_dir / "head_types.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
    return scores
