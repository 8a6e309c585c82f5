"""Translation on a real corpus: what ``tfkit train translation --data FILE`` chooses by itself,
against a sweep over vocabulary size × d_model given the same wall time.

Every point trains with the sizes chosen from the data except the two swept. A d_model that costs
more per step gets fewer steps, so that each point trains for about as long as the default does
(measured on a 40-step probe). Each run is scored on the validation split (beam 4) only: the sweep
chooses a rule (tfkit.data.MEDIAN_COUNT), so the test split stays unseen until the rule is fixed.

    python benchmarks/gettext_corpus.py /tmp/de.tsv
    python benchmarks/vocab_sweep.py /tmp/de.tsv /tmp/sweep --vocab 1000 2000 4000 8000 --d-model 128 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import yaml


def train(data: str, out: Path, sets: list[str]) -> float:
    """Train a run into ``out`` (kept when it is already there) and return its training seconds."""
    if not (out / "config.yaml").exists() or not (out / "metrics.jsonl").read_text().strip():
        subprocess.run(
            [
                "tfkit",
                "train",
                "translation",
                "--data",
                data,
                "--out",
                str(out),
                "--set",
                "train.eval_every=0",
                *(f"--set={s}" for s in sets),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["seconds"] for r in records if "loss" in r)


def score(out: Path) -> dict[str, float]:
    printed = subprocess.run(
        ["tfkit", "evaluate", str(out), "--split", "validation", "--json"], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(printed.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--d-model", type=int, nargs="+", default=[128, 256])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    seconds = train(args.data, args.out / "default", [])
    chosen = yaml.safe_load((args.out / "default" / "config.yaml").read_text())
    steps, default = chosen["train"]["steps"], (chosen["data"]["vocab_size"], chosen["model"]["d_model"])
    rows = [("default", seconds, steps, score(args.out / "default"))]
    for d_model in args.d_model:
        sizes = [f"model.d_model={d_model}", f"model.d_ff={4 * d_model}"]
        probe = train(args.data, args.out / f"probe-d{d_model}", [*sizes, "train.steps=40", "data.vocab_size=2000"])
        base = train(args.data, args.out / f"probe-d{default[1]}", ["train.steps=40", "data.vocab_size=2000"])
        matched = int(steps * base / probe)
        for vocab in args.vocab:
            if (vocab, d_model) == default and matched == steps:
                continue  # the default run itself
            run = args.out / f"v{vocab}-d{d_model}"
            took = train(args.data, run, [*sizes, f"data.vocab_size={vocab}", f"train.steps={matched}"])
            rows.append((run.name, took, matched, score(run)))
            print(json.dumps({"run": run.name, "seconds": round(took), "steps": matched, **rows[-1][3]}), flush=True)
    print(f"\n{'run':>14} {'train s':>8} {'steps':>6} {'BLEU':>6} {'chrF':>6}")
    for name, took, n, metrics in rows:
        print(f"{name:>14} {took:8.0f} {n:6d} {metrics['bleu']:6.2f} {metrics['chrf']:6.2f}")
    print(f"({time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
