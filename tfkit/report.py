"""``tfkit report RUN [RUN ...]``: what training did, as one self-contained page and its PNGs.

Every quantity in metrics.jsonl (the training loss, the learning rate, the throughput and each
validation metric) is drawn against the step and against the training time, one line per run, so
that two runs (two attention variants, a Transformer and its baseline) are compared in one picture.
A table gives each run's last values, and the config keys that differ between the runs (all of them
for one run). The figures are inline PNGs (data: URLs) and the page loads nothing (the same Content-Security-Policy
as the inspection page's, with no script at all); each figure is also written as a PNG beside it.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tfkit import run as runs  # noqa: E402
from tfkit.config import flatten  # noqa: E402
from tfkit.errors import UsageError  # noqa: E402
from tfkit.page import asset, sha256  # noqa: E402

TRAINING = {"loss": "training loss", "lr": "learning rate", "items_per_s": "throughput (items/s)"}
NOT_DRAWN = {"step", "seconds", "split"}


def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float | None, float]]]:
    """Quantity → [(step, seconds or None, value)] in the records' order; validation metrics are
    named by their split ("validation bleu")."""
    out: dict[str, list[tuple[int, float | None, float]]] = {}
    for record in records:
        split = record.get("split")
        for key, value in record.items():
            if key in NOT_DRAWN or not isinstance(value, (int, float)):
                continue
            name = f"{split} {key}" if split else TRAINING.get(key, key)
            out.setdefault(name, []).append((record["step"], record.get("seconds"), float(value)))
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    """The runs' folder names, with their parents where two share one."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def _figure(quantity: str, drawn: list[tuple[str, list[tuple[int, float | None, float]]]]) -> plt.Figure:
    timed = any(s is not None for _, points in drawn for _, s, _ in points)
    figure, axes = plt.subplots(1, 2 if timed else 1, figsize=(9 if timed else 4.8, 3.2), squeeze=False)
    for index, (label, points) in enumerate(drawn):
        steps = [step for step, _, _ in points]
        values = [value for _, _, value in points]
        marker = "o" if len(points) < 30 else None
        (line,) = axes[0, 0].plot(steps, values, marker=marker, markersize=3, label=label)
        if timed:
            kept = [(s, v) for _, s, v in points if s is not None]
            axes[0, 1].plot(
                [s for s, _ in kept], [v for _, v in kept], marker=marker, markersize=3, label=label, color=line.get_color()
            )
    for ax, across in zip(axes[0], ("step", "training seconds")):
        ax.set_xlabel(across)
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        if quantity in ("training loss", "learning rate") and all(v > 0 for _, points in drawn for _, _, v in points):
            ax.set_yscale("log")
    if len(drawn) > 1:
        axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out``/report.html and a PNG per quantity; returns the page's path."""
    for run_dir in run_dirs:
        if not (run_dir / runs.METRICS).is_file():
            raise UsageError(f"{run_dir} is not a run directory (it has no {runs.METRICS})")
    labels = _labels(run_dirs)
    configs = [flatten(runs.read_config(d)) for d in run_dirs]
    found = [curves(runs.read_metrics(d)) for d in run_dirs]
    quantities = list(dict.fromkeys(q for per_run in found for q in per_run))
    runs.make_dir(out)
    figures = []
    for quantity in quantities:
        drawn = [(label, per_run[quantity]) for label, per_run in zip(labels, found) if quantity in per_run]
        figure = _figure(quantity, drawn)
        png = _png(figure)
        plt.close(figure)
        (out / f"{_slug(quantity)}.png").write_bytes(png)
        figures.append((quantity, [label for label, _ in drawn], base64.b64encode(png).decode("ascii")))

    keys = list(dict.fromkeys(k for config in configs for k in config))
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1] if len(configs) > 1 else keys
    last = [{q: points[-1][2] for q, points in per_run.items()} for per_run in found]
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    summary = [
        ("recipe", [c.get("recipe", "") for c in configs]),
        ("steps", [max((p[0] for points in per_run.values() for p in points), default=0) for per_run in found]),
        (
            "training seconds",
            [max((p[1] for points in per_run.values() for p in points if p[1] is not None), default="") for per_run in found],
        ),
    ]
    summary += [(f"last {q}", [row.get(q, "") for row in last]) for q in quantities]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>{''.join(f'<td>{_cell(v)}</td>' for v in values)}</tr>" for name, values in summary
    )
    config_rows = "".join(
        f"<tr><td>{html.escape(k)}</td>{''.join(f'<td>{_cell(c.get(k, chr(8212)))}</td>' for c in configs)}</tr>"
        for k in differing
    )
    same = len(keys) - len(differing)
    if not differing:
        config_rows = f"<tr><td colspan='{len(labels) + 1}'>none: the runs have the same config</td></tr>"
    config_title = "config" if len(configs) == 1 else f"config keys that differ ({same} others are the same)"
    body = (
        f"<section class='card'><h2>runs</h2><table id='runs'><thead><tr><th></th>{header}</tr></thead><tbody>{rows}</tbody></table></section>"
        f"<section class='card'><h2>{config_title}</h2><table id='config'><thead><tr><th>key</th>{header}</tr></thead>"
        f"<tbody>{config_rows}</tbody></table></section>"
        + "<div class='row'>"
        + "".join(
            f"<section class='card figure' id='{_slug(q)}' data-runs='{html.escape(chr(10).join(drawn))}'><h2>{html.escape(q)}</h2>"
            f"<img alt='{html.escape(q)}' src='data:image/png;base64,{png}'></section>"
            for q, drawn, png in figures
        )
        + "</div>"
    )
    style = asset("page.css")
    policy = f"default-src 'none'; style-src {sha256(style)}; img-src data:; base-uri 'none'; form-action 'none'"
    title = "training: " + ", ".join(labels)
    page = (
        f"<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>\n<title>{html.escape(title)}</title>\n"
        f"<link rel='icon' href='data:,'>\n<style>{style}</style>\n</head>\n"
        f"<body><header><h1>{html.escape(title)}</h1></header><main>{body}</main></body>\n</html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
