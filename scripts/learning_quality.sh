#!/usr/bin/env bash
# Regenerates every learning-quality table and plot of the README (test splits, seeds 0,1,2).
# Defaults were chosen beforehand on validation splits with scripts/sweep.py; nothing here
# feeds back into a default. Results go to results/quality/ (not tracked by git). Finished
# files are skipped and a killed job keeps its finished runs (--resume), so a rerun resumes.
# On a quiet 2-core machine the whole set takes a few hours; each part can be run alone:
#   scripts/learning_quality.sh fewshot
set -euo pipefail
cd "$(dirname "$0")/.."
EVAL=".venv/bin/cbpnet-eval"
OUT=results/quality
SEEDS=0,1,2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

run() {  # run <result file> <cbpnet-eval options...>: skipped when already finished
  local out="$1"; shift
  if [ -f "$out" ] && ! grep -q '"partial": true' "$out"; then return 0; fi
  echo "== $out" >&2
  "$EVAL" "$@" --seeds "$SEEDS" --quiet --resume --out "$out" > "${out%.json}.log" 2>&1
}
# (SEEDS=0 run ... runs one seed)

declare -A DATA=(
  [digits]="--dataset digits"
  [fmnist200]="--dataset fashion-mnist --train-per-class 200 --test-per-class 100"
  [fmnist1000]="--dataset fashion-mnist --train-per-class 1000 --test-per-class 200"
)
PARTS=${*:-"paper compare ablation fewshot unknown lifetime plasticity spread keys adapt"}

for part in $PARTS; do
  case $part in
  compare)  # every method, 5 tasks of 2 classes
    for d in digits fmnist200 fmnist1000; do
      run "$OUT/${d}_methods.json" ${DATA[$d]} --tasks 5 \
        --method cbpnet,cbpnet-nocbp,joint,dualprompt,lda,ranpac,ncm,linear --plot "$OUT/${d}_methods.png"
      run "$OUT/${d}_baselines_multilayer.json" ${DATA[$d]} --tasks 5 --method lda,ranpac,ncm \
        --baseline-query multilayer
    done ;;
  ablation)  # the learned parts on top of the statistics, one at a time
    for d in digits fmnist200; do
      run "$OUT/${d}_ablation_prompts.json" ${DATA[$d]} --tasks 5 --method cbpnet \
        --prediction task --train-cbp-block false --tag "+ prompts and head"
      run "$OUT/${d}_ablation_block.json" ${DATA[$d]} --tasks 5 --method cbpnet-nocbp \
        --prediction task --tag "+ prompts, head, CBP block (no replacement)"
      run "$OUT/${d}_ablation_cbp.json" ${DATA[$d]} --tasks 5 --method cbpnet \
        --prediction task --tag "+ prompts, head, CBP block with replacement"
      run "$OUT/${d}_ablation_joint.json" ${DATA[$d]} --tasks 5 --method joint \
        --prediction task --tag "learned recipe, all classes at once"
    done ;;
  fewshot)  # a robot taught with a handful of views
    for shots in 5 10 20; do
      for d in digits fashion-mnist; do
        run "$OUT/${d}_shots${shots}.json" --dataset $d --train-per-class $shots \
          --test-per-class 100 --tasks 5 \
          --method cbpnet,cbpnet-nocbp,joint,dualprompt,lda,ranpac,ncm,linear
      done
    done ;;
  unknown)  # open world: the last 2 classes never taught
    for d in digits fmnist200; do
      run "$OUT/${d}_unknown.json" ${DATA[$d]} --tasks 4 --unknown-classes 2 --method cbpnet
    done ;;
  paper)  # the published recipe (CBP on / off) against the default and the same-feature
          # baselines, on the 5 x 2 task shape and the paper's 2 x 5
    for tasks in 5 2; do
      for d in digits fmnist200 fmnist1000; do
        run "$OUT/${d}_paper_t${tasks}.json" ${DATA[$d]} --tasks $tasks \
          --method cbpnet,cbpnet-paper,dualprompt --plot "$OUT/${d}_paper_t${tasks}.png"
        run "$OUT/${d}_paper_t${tasks}_baselines.json" ${DATA[$d]} --tasks $tasks \
          --method ncm,lda,ranpac --baseline-query multilayer
      done
    done ;;
  plasticity)  # the learned parts alone, 200 binary tasks, a fresh head each (Dohare et al.)
    for d in digits fashion-mnist; do
      for path in residual no-skip; do
        run "$OUT/${d}_plasticity_${path}.json" --dataset $d --protocol plasticity \
          --plasticity-path $path --method cbpnet,cbpnet-nocbp \
          --plot "$OUT/${d}_plasticity_${path}.png"
      done
      # the prompts trained too (one seed: every step runs the backbone's last stages)
      SEEDS=0 run "$OUT/${d}_plasticity_prompts.json" --dataset $d --protocol plasticity \
        --plasticity-prompts true --method cbpnet,cbpnet-nocbp \
        --plot "$OUT/${d}_plasticity_prompts.png"
    done ;;
  spread|keys)  # validation sweeps behind the spread rule and the key steps
    for tasks in 5 2; do
      [ "$part" = spread ] && [ $tasks = 2 ] && continue
      .venv/bin/python scripts/sweep.py --groups "$part" --tasks $tasks \
        --out "$OUT/sweep_t${tasks}" > "$OUT/sweep_${part}_t${tasks}.txt"
    done ;;
  adapt)  # the bounded adapt-then-accumulate study (validation splits)
    # (adapt_study.py has no --resume: a finished file is skipped as run() skips its own)
    [ -f "$OUT/adapt_1000.json" ] || .venv/bin/python scripts/adapt_study.py \
      --train-per-class 1000 --seeds 0,1,2 --out "$OUT/adapt_1000.json" > "$OUT/adapt_1000.txt"
    [ -f "$OUT/adapt_6000.json" ] || .venv/bin/python scripts/adapt_study.py \
      --train-per-class 6000 --seeds 0,1 --out "$OUT/adapt_6000.json" > "$OUT/adapt_6000.txt" ;;
  lifetime)  # 50 new pairs of classes; the learned recipe with CBP on and off
    for d in fashion-mnist digits; do
      run "$OUT/${d}_lifetime.json" --dataset $d --protocol lifetime --lifetime-tasks 50 \
        --method cbpnet,cbpnet-nocbp --prediction task --plot "$OUT/${d}_lifetime.png"
      run "$OUT/${d}_lifetime_stats.json" --dataset $d --protocol lifetime --lifetime-tasks 50 \
        --method cbpnet
    done ;;
  *) echo "unknown part $part (paper compare ablation fewshot unknown lifetime plasticity" \
          "spread keys adapt)" >&2; exit 2 ;;
  esac
done
echo "results in $OUT; tables: .venv/bin/cbpnet-eval --compare $OUT/<file>.json ..." >&2
