"""How a conformer run does on speech it never trained on: its test split (unseen eSpeak voices), the
held-out channel, eSpeak's plain default voice as a user would record it, and a different synthesiser.

    python benchmarks/unseen_speech.py RUN [--strings 10] [--seed 1] [--beam 1]

Rows (greedy decoding unless --beam):
- ``test`` and ``test_channel``: the run's own evaluation (``tfkit evaluate RUN``).
- ``espeak-ng default voice``: digit strings in eSpeak NG's plain voice at its default rate and pitch,
  clean, with the 0.3 s of silence that ``espeak-ng -w`` ends a file with; through the ``espeak-ng``
  command itself when it is installed (Debian: espeak-ng), else through the library tfkit trains with.
- ``flite VOICE``: the same strings spoken by Festival Lite (Debian: flite), a synthesiser tfkit never
  trains on, in each of its voices; skipped when ``flite`` is not installed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tfkit import registry
from tfkit import run as runs
from tfkit.recipes.conformer.data import default_voice_files, digit_strings, read_audio
from tfkit.recipes.conformer.recipe import error_rate

FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")


def flite_files(texts: list[str], voice: str, folder: Path) -> list[Path]:
    paths = [folder / f"flite-{voice}{i}.wav" for i in range(len(texts))]
    for text, path in zip(texts, paths):
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--strings", type=int, default=10, help="digit strings per voice")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--beam", type=int, default=1, help="1: greedy; more: CTC prefix beam search")
    args = parser.parse_args()
    registry.load_all()
    torch.set_num_threads(2)
    recipe, model = runs.open_run(args.run)
    recipe.prepare(args.run)
    table = Table(title=f"{args.run}: speech it never trained on ({'greedy' if args.beam == 1 else f'beam {args.beam}'})")
    for column in ("set", "utterances", "CER %", "WER %", "exact"):
        table.add_column(column, justify="left" if column == "set" else "right")
    metrics = recipe.evaluate(model, "test", beam=args.beam)
    for (prefix, count), name in zip(recipe.parts["test"], ("test (unseen voices)", "test_channel (and an unseen channel)")):
        table.add_row(name, str(count), f"{metrics[prefix + 'cer']:.2f}", f"{metrics[prefix + 'wer']:.2f}", "")
    texts = digit_strings(args.strings, args.seed)
    sample_rate = recipe.config["data"]["sample_rate"]
    log_mel = recipe._log_mel()
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "espeak-ng default voice" + ("" if shutil.which("espeak-ng") else " (library + 0.3 s)"): default_voice_files(
                texts, Path(tmp)
            )
        }
        if shutil.which("flite"):
            sets.update({f"flite {voice}": flite_files(texts, voice, Path(tmp)) for voice in FLITE_VOICES})
        for name, paths in sets.items():
            hyps = recipe.transcribe(model, [log_mel(read_audio(p, None, sample_rate)) for p in paths], args.beam)
            hyps = [hyps[i] for i in range(len(paths))]
            exact = sum(h == t for h, t in zip(hyps, texts))
            cer = error_rate([list(h) for h in hyps], [list(t) for t in texts])
            wer = error_rate([h.split() for h in hyps], [t.split() for t in texts])
            table.add_row(name, str(len(paths)), f"{cer:.2f}", f"{wer:.2f}", f"{exact}/{len(paths)}")
            for h, t in zip(hyps, texts):
                if h != t:
                    print(f"{name}: {t!r} -> {h!r}")
    Console().print(table)


if __name__ == "__main__":
    main()
