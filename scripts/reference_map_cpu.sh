#!/usr/bin/env bash
# Issue 22 part 5 on a CPU (docs/results.md 2g): per-epoch, adaptive and per-step references against FT,
# on docs/results.md 2f's taught ARC-C split, on a taught split of long MMLU prompts, and (Momentum 3e-4 and
# AdamW 1e-4 against FT) on taught splits of CSQA and MMLU (seed 0) and ARC-C with seed 1. One thread on one
# core (CORE, default 1) so that two such runs can share a 2-core machine. The per-epoch and per-step runs
# pass --adaptive-reference off (the adaptive period is inject's default). About 75 minutes on a Zen 3 core
# for the first two splits, 20 for each of the other three.
#   bash scripts/reference_map_cpu.sh runs/cpu_arc/taught runs/reference_map
set -euo pipefail
taught=${1:?the taught ARC-C split (python -m cnl_ext teach ... --out DIR, as in docs/results.md 2f)}
out=${2:?output folder}
data=${CNL_PAPER_DATA:-../shared/data/cnl-paper}
core=${CORE:-1}
inject() { taskset -c "$core" python -m cnl_ext inject --threads 1 --no-checkpoints "$@"; }
arc=(--model "$taught/model" --mastered "$taught/mastered.jsonl" --injection "$taught/injection.jsonl" --epochs 2)
inject "${arc[@]}" --optimizers momentum --lr 3e-4 --methods ft cnl --adaptive-reference off --out "$out/arc_momentum_epoch"
inject "${arc[@]}" --optimizers momentum --lr 3e-4 --methods cnl --adaptive-reference 0.02 --out "$out/arc_momentum_adaptive"
inject "${arc[@]}" --optimizers momentum --lr 3e-4 --methods cnl --adaptive-reference off --reference-every 1 --out "$out/arc_momentum_step"
inject "${arc[@]}" --optimizers adamw --lr 1e-4 --methods cnl --adaptive-reference 0.02 --out "$out/arc_adamw_adaptive"
python bench/long_prompts.py --data "$data" --out "$out/long/pool" --mastered 16 --injection 16
taskset -c "$core" python -m cnl_ext teach --threads 1 --data "$out/long/pool/mastered.jsonl" "$out/long/pool/injection.jsonl" \
  --limit 32 --seed 0 --teach-fraction 0.5 --teach-lr 2e-4 --teach-epochs 6 --teach-margin 1.0 --out "$out/long/taught"
long=(--model "$out/long/taught/model" --mastered "$out/long/taught/mastered.jsonl"
      --injection "$out/long/taught/injection.jsonl" --optimizers adam --lr 1e-4 --epochs 1)
inject "${long[@]}" --methods ft cnl --adaptive-reference off --out "$out/long_adam_epoch"
inject "${long[@]}" --methods cnl --adaptive-reference 0.02 --out "$out/long_adam_adaptive"
inject "${long[@]}" --methods cnl --adaptive-reference off --reference-every 1 --out "$out/long_adam_step"
for spec in "csqa|csqa|0" "mmlu|mmlu|0" "arc-s1|arc_c|1"; do
  IFS='|' read -r name file seed <<< "$spec"
  taskset -c "$core" python -m cnl_ext teach --threads 1 --data "$data/${file}_correct_Qwen2.5-1.5B-Instruct.jsonl" \
    "$data/${file}_wrong_Qwen2.5-1.5B-Instruct.jsonl" --limit 32 --seed "$seed" --teach-fraction 0.5 --teach-lr 2e-4 \
    --teach-epochs 6 --teach-margin 1.0 --out "$out/$name/taught"
  split=(--model "$out/$name/taught/model" --mastered "$out/$name/taught/mastered.jsonl"
         --injection "$out/$name/taught/injection.jsonl" --epochs 2)
  inject "${split[@]}" --optimizers momentum --lr 3e-4 --methods ft cnl --adaptive-reference off --out "$out/${name}_momentum_epoch"
  inject "${split[@]}" --optimizers momentum --lr 3e-4 --methods cnl --adaptive-reference 0.02 --out "$out/${name}_momentum_adaptive"
  inject "${split[@]}" --optimizers adamw --lr 1e-4 --methods ft cnl --adaptive-reference off --out "$out/${name}_adamw_epoch"
done
