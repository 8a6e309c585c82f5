#!/usr/bin/env bash
# The GPU part of the benchmark in one go, for a short lease on a CUDA machine:
#   1. every recipe trains a few hundred steps on the GPU (bf16 autocast, the default there) and a
#      translation run decodes with beam search on it: the CUDA path of train, evaluate and predict;
#   2. the benchmark table at base sizes (Transformer-base, ViT-B/16, BERT-base, Conformer-M), bf16;
#   3. the same at the CPU sizes, bf16.
# Into OUT (default: gpu-bench/) go five files: summary.txt, train.log, bench.txt and the two tables'
# JSON; the run directories go to a temporary folder. Needs tfkit installed with the bench extra.
#   bash benchmarks/gpu.sh [OUT] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-gpu-bench}")"
steps="${2:-300}"
mkdir -p "$out"
runs="$(mktemp -d)"
trap 'rm -rf "$runs"' EXIT
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/summary.txt" 2>&1 || true

for recipe in translation vit bert-pretrain conformer; do
    start=$SECONDS
    echo "== tfkit train $recipe --device cuda --max-steps $steps" >>"$out/train.log"
    if tfkit train "$recipe" --device cuda --max-steps "$steps" --out "$runs/$recipe" >>"$out/train.log" 2>&1; then
        echo "train $recipe: ok, $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    else
        echo "train $recipe: FAILED after $((SECONDS - start)) s (see train.log)" | tee -a "$out/summary.txt"
    fi
done
if [ -d "$runs/translation" ]; then
    printf 'one hundred and twenty-three\nfour thousand and five\n' >"$runs/sentences.txt"
    echo "== tfkit predict translation --beam 4 --device cuda" >>"$out/train.log"
    if tfkit predict "$runs/translation" "$runs/sentences.txt" --beam 4 --device cuda >>"$out/train.log" 2>&1; then
        echo "predict translation --beam 4: ok" | tee -a "$out/summary.txt"
    else
        echo "predict translation --beam 4: FAILED (see train.log)" | tee -a "$out/summary.txt"
    fi
fi

for size in base small; do
    python3 benchmarks/run.py --device cuda --precision bf16 --size "$size" --json "$out/bench-$size-bf16.json" \
        2>&1 | tee -a "$out/bench.txt"
done
