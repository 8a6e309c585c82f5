"""The forecast recipe's comparison table over several seeds: mean ± sd per row on the test part.

For each seed the recipe is trained as ``tfkit train forecast --set seed=S`` would train it, its best
checkpoint (by validation MASE) is scored once on the test origins, and the peers are fitted as
``tfkit evaluate`` fits them: the classical rows (statsforecast, fitted on the training part only; the
same for every seed, so their sd is 0) and DLinear and the LSTM, trained with that seed and the
Transformer's budget (steps and schedule). The percentage is against the classical row with the lowest
validation MASE. A gap smaller than twice the standard error of the difference is called a tie.

    python benchmarks/forecast_table.py                                  # weekly CO2, seeds 0 1 2
    python benchmarks/forecast_table.py --set data.name=macro            # the quarterly macro table
    python benchmarks/forecast_table.py --set data.name=planted --set data.context=48 --set data.horizon=1 ...
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from tfkit import config as configs
from tfkit import registry
from tfkit import run as runs
from tfkit.train import start_training

METRICS = ("mase", "smape", "mae", "pearson")


def one_seed(sets: list[str], seed: int, out: Path) -> tuple[dict[str, dict[str, float]], str, dict]:
    """{row: test metrics} for one seed, the reference row, and the chosen sizes."""
    config = configs.resolve(
        registry.get("recipe", "forecast").default_config(), None, [*sets, f"seed={seed}", "baselines.seeds=1"]
    )
    trainer = start_training(config, out / f"seed{seed}", torch.device("cpu"))
    trainer.fit(progress=False)
    run_dir = trainer.run_dir
    recipe, model = runs.open_run(run_dir, "cpu", "auto")
    recipe.prepare(run_dir)
    rows = {"PatchTST (tfkit, this recipe)": recipe.evaluate(model, "test")}
    rows.update(recipe.baselines("test"))
    return rows, recipe.reference, recipe.config


def strip_seeds(row: str) -> str:
    return row.replace("; 1 seeds)", ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a config override, as tfkit train --set")
    parser.add_argument("--json", type=Path, help="also write the per-seed rows here")
    args = parser.parse_args()
    registry.load_all()
    started = time.perf_counter()
    per_seed, reference, config = [], None, None
    with TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows, reference, config = one_seed(args.sets, seed, Path(tmp))
            per_seed.append({strip_seeds(k): v for k, v in rows.items()})
            print(f"seed {seed}: " + ", ".join(f"{k} {v['mase']:.3f}" for k, v in per_seed[-1].items()), flush=True)
    reference = strip_seeds(reference)
    n = len(per_seed)
    table = {
        row: {
            m: (
                float(np.mean([s[row][m] for s in per_seed])),
                float(np.std([s[row][m] for s in per_seed], ddof=1)) if n > 1 else 0.0,
            )
            for m in METRICS
        }
        for row in per_seed[0]
    }
    base = table[reference]["mase"][0]
    print(
        f"\n{config['data']['name']}: test part, {n} seeds ({', '.join(map(str, args.seeds))}); Transformer {config['train']['steps']} steps, "
        f"DLinear and LSTM {config['baselines']['steps']} steps, both {config['train']['schedule']} with {config['train']['warmup']} warmup; "
        f"% against {reference} (the best classical row on validation); {time.perf_counter() - started:.0f} s\n"
    )
    print("| model | MASE | vs reference | sMAPE (%) | MAE | Pearson |")
    print("|-------|-----:|-----:|-----:|-----:|-----:|")
    ours = table["PatchTST (tfkit, this recipe)"]["mase"]
    for row, values in sorted(table.items(), key=lambda kv: kv[1]["mase"][0]):
        cells = [f"{values[m][0]:.3f} ± {values[m][1]:.3f}" for m in METRICS]
        change = f"{100 * (values['mase'][0] - base) / base:+.1f}%" if row != reference else "reference"
        print(f"| {row} | {cells[0]} | {change} | {' | '.join(cells[1:])} |")
    for row, values in table.items():  # the Transformer against each peer: a win, a loss, or a tie
        if row.startswith("PatchTST"):
            continue
        gap = ours[0] - values["mase"][0]
        noise = 2 * math.sqrt((ours[1] ** 2 + values["mase"][1] ** 2) / n)
        verdict = "tie" if abs(gap) <= noise else ("PatchTST better" if gap < 0 else "PatchTST worse")
        print(f"PatchTST vs {row}: MASE gap {gap:+.3f}, 2·se {noise:.3f}: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "rows": per_seed, "reference": reference}, indent=1))


if __name__ == "__main__":
    main()
