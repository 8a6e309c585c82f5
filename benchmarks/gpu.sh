#!/usr/bin/env bash
# The GPU part of the benchmark in one go, for a short lease on a CUDA machine:
#   1. every recipe trains a few hundred steps on the GPU (bf16 autocast, the default there) and a
#      translation run decodes with beam search on it: the CUDA path of train, evaluate and predict;
#   2. the benchmark table at base sizes (Transformer-base, ViT-B/16, BERT-base, Conformer-M), bf16;
#   3. the same at the CPU sizes, bf16.
# Tables, JSON and logs go to OUT (default: gpu-bench/). Needs tfkit installed with the bench extra.
#   bash benchmarks/gpu.sh [OUT] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-gpu-bench}")"
steps="${2:-300}"
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1 || true

for recipe in translation vit bert-pretrain conformer; do
    start=$SECONDS
    if tfkit train "$recipe" --device cuda --max-steps "$steps" --out "$out/runs/$recipe" >"$out/train-$recipe.log" 2>&1; then
        echo "train $recipe: ok, $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    else
        echo "train $recipe: FAILED after $((SECONDS - start)) s (log: train-$recipe.log)" | tee -a "$out/summary.txt"
    fi
done
if [ -d "$out/runs/translation" ]; then
    printf 'one hundred and twenty-three\nfour thousand and five\n' >"$out/sentences.txt"
    if tfkit predict "$out/runs/translation" "$out/sentences.txt" --beam 4 --device cuda >"$out/predict-translation.log" 2>&1; then
        echo "predict translation --beam 4: ok" | tee -a "$out/summary.txt"
    else
        echo "predict translation --beam 4: FAILED (log: predict-translation.log)" | tee -a "$out/summary.txt"
    fi
fi

for size in base small; do
    python3 benchmarks/run.py --device cuda --precision bf16 --size "$size" --json "$out/bench-$size-bf16.json" \
        2>&1 | tee "$out/bench-$size-bf16.txt"
done
