"""report.html: one self-contained page to look at every head of one inspected input.

Scripts, styles and data are inlined into one file, and a Content-Security-Policy lets the page run
only its own script and style (by hash) and load nothing from anywhere, so it opens from file://
offline and no request leaves it. The page code (tfkit/web/) is recipe-agnostic: a recipe adds its
own views as data, through :attr:`tfkit.recipe.AttentionExample.page`.

Weights travel as 8 bits of √w (fine steps near 0, where a diffuse head's weights are: 1/512 keeps
9% precision), deflated and base64-encoded, one blob per module that the page inflates when the
module is first opened. A 12-layer × 12-head × 512-token input fits; past :data:`CAP` weights in all,
the later modules are listed (table, thumbnails) but their full matrices stay in attention.npz only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tfkit.errors import TfkitError
from tfkit.inspect import head_summary
from tfkit.recipe import AttentionExample

CAP = 40_000_000  # weights embedded in all: 12 layers × 12 heads × 512² is 37.7M
THUMB = 32  # a thumbnail has at most this many cells a side (block means)
PANEL_KINDS = ("text", "table", "image", "plot", "alignment")


def quantise(weights: np.ndarray) -> np.ndarray:
    """Attention weights in [0, 1] → uint8 round(255·√w); the page decodes (q/255)²."""
    return np.round(np.sqrt(np.clip(weights, 0.0, 1.0)) * 255).astype(np.uint8)


def dequantise(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) / 255) ** 2


def _blob(codes: np.ndarray) -> str:
    # zlib's format is what the browser's DecompressionStream("deflate") reads; level 1 is 7× faster
    # than 6 for 13% more bytes on diffuse weights
    return base64.b64encode(zlib.compress(np.ascontiguousarray(codes).tobytes(), 1)).decode("ascii")


def _block_means(weights: np.ndarray, size: int) -> np.ndarray:
    """(H, Tq, Tk) → (H, ≤size, ≤size): the mean of each block of queries and keys."""
    for axis in (1, 2):
        n = weights.shape[axis]
        if n > size:
            edges = np.linspace(0, n, size + 1).astype(int)[:-1]
            weights = np.add.reduceat(weights, edges, axis=axis) / np.diff(np.append(edges, n)).reshape(
                [-1 if a == axis else 1 for a in range(3)]
            )
    return weights


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    """Any other array (an image, a spectrogram, a rollout map) in 8 bits over its own range."""
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise TfkitError("a page array holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    codes = np.round((a - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
    return {"shape": list(a.shape), "lo": lo, "hi": hi, "bytes": base64.b64encode(codes.tobytes()).decode("ascii")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _encode_array(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def page_data(
    title: str,
    example: AttentionExample,
    weights: dict[str, np.ndarray],
    head_types: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, Any]:
    """What the page gets: axes, modules (weights within :data:`CAP`), the per-head table, the recipe's views."""
    modules, budget = [], CAP
    for name, w in weights.items():
        queries, keys = example.axes(name)
        fits = w.size <= budget
        budget = budget - w.size if fits else 0  # once one is left out, so are the rest: the page keeps the npz's order
        thumbs = _block_means(w, THUMB)
        modules.append(
            {
                "name": name,
                "queries": queries,
                "keys": keys,
                "shape": list(w.shape),
                "weights": _blob(quantise(w)) if fits else None,
                "thumbs": _blob(quantise(thumbs)),
                "thumb_shape": list(thumbs.shape[1:]),
            }
        )
    kinds = list(dict.fromkeys(k for per_module in (head_types or {}).values() for k in per_module))
    rows = []
    for name, w in weights.items():
        for head, entropy, token, weight in head_summary(w, example.tokens[example.axes(name)[1]]):
            scores = [round(head_types[name][k][head], 4) if head_types and name in head_types else None for k in kinds]
            rows.append([name, head, round(entropy, 4), token, round(weight, 4), *scores])
    extra = example.page(weights) if example.page is not None else {}
    for panel in extra.get("panels", []):
        if panel.get("kind") not in PANEL_KINDS:
            raise TfkitError(f"the recipe's page panel kind {panel.get('kind')!r} is not one of {', '.join(PANEL_KINDS)}")
        if panel["kind"] == "plot" and not all(isinstance(line, list) for line in panel["lines"].values()):
            raise TfkitError(f"the plot panel {panel.get('title')!r} needs its lines as lists of numbers")
    return {
        "title": title,
        "axes": example.tokens,
        "modules": modules,
        "cap": CAP,
        "table": {"columns": ["module", "head", "entropy (nats)", "most attended", "weight", *kinds], "rows": rows},
        "panels": _jsonable(extra.get("panels", [])),
        "boundaries": extra.get("boundaries", {}),
    }


def asset(name: str) -> str:
    return (resources.files("tfkit") / "web" / name).read_text(encoding="utf-8")


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render(data: dict[str, Any]) -> str:
    """The page as one HTML string."""
    script, style = asset("attention.js"), asset("page.css")
    # only this script and style may run, nothing may be fetched; connect-src etc. fall back to 'none'
    policy = f"default-src 'none'; script-src {sha256(script)}; style-src {sha256(style)}; img-src data:; base-uri 'none'; form-action 'none'"
    # "</script" or "<!--" inside a <script> block would change how it parses; "<" is only ever in
    # JSON strings, where \u003c means the same
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    fields = {"policy": policy, "title": html.escape(data["title"]), "style": style, "script": script, "data": payload}
    # one pass, so that nothing inserted (a title, the data) is itself searched for fields
    return re.sub(r"\{\{(\w+)\}\}", lambda match: fields[match.group(1)], asset("attention.html"))


def write_report(
    path: Path,
    title: str,
    example: AttentionExample,
    weights: dict[str, np.ndarray],
    head_types: dict[str, dict[str, list[float]]] | None = None,
) -> list[str]:
    """Write report.html; returns the names of the modules left out of it past :data:`CAP`."""
    data = page_data(title, example, weights, head_types)
    path.write_text(render(data), encoding="utf-8")
    return [m["name"] for m in data["modules"] if m["weights"] is None]
