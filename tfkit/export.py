"""Taking a trained run elsewhere: ``tfkit export RUN OUT --to hf|onnx``.

``hf`` writes the folder a ``transformers`` Auto class loads without custom code (each recipe's
:meth:`~tfkit.recipe.Recipe.export_hf` knows its counterpart); ``onnx`` writes the inference graphs
(:mod:`tfkit.onnx`). Either is written into a hidden folder beside OUT and renamed to OUT when whole,
so a failed export leaves nothing that looks like one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tfkit import run as runs
from tfkit.errors import UsageError

FORMATS = ("hf", "onnx")


def export(run_dir: Path, out: Path, to: str, checkpoint: str = "auto") -> str:
    """Export and return a line on what was written."""
    if to not in FORMATS:
        raise UsageError(f"unknown --to '{to}' (valid: {', '.join(FORMATS)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not an empty folder (pick another OUT)")
    recipe, model = runs.open_run(run_dir, "cpu", checkpoint)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    runs.make_dir(tmp)
    try:
        if to == "hf":
            recipe.export_hf(model, tmp)
            note = "a transformers folder"
        else:
            from tfkit.onnx import export_onnx

            worst = export_onnx(recipe, model, tmp)
            note = f"onnxruntime gives PyTorch's outputs to {worst:.1g} at two batch sizes and two lengths"
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"wrote {out} ({note})"
