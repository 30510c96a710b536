#!/usr/bin/env bash
# Every GPU measurement issue 4 asks for, in order of value, from the repository root:
#
#     bash benchmarks/gpu_session.sh [RESULTS_DIR] [STAGE ...]
#
# Stages (default: all, in this order; name some to run only those):
#   check     versions, nvidia-smi, and the GPU-only kernel tests (compiled
#             Triton kernels and the custom VJP against float64 / pure jnp)
#   floor     the device's FP32 instruction rate and copy bandwidth, and each
#             ResNet-20 adder layer's floor at batch 256 (floor.json)
#   ops       per layer: adder forward / forward+backward, Pallas (Triton, then
#             the Mosaic GPU forward) and pure jnp, against lax.conv (cuDNN),
#             as fractions of the floor (ops.jsonl)
#   step      the real ResNet-20 training step (train_lib: the config's
#             optimizer, on-device augmentation) and its per-epoch evaluation
#             at batch 256: adder with the Pallas kernels (Triton; Mosaic GPU
#             forward), adder on the pure-jnp path, and the identical CNN
#             (step.jsonl: what ran in every layer, gradients against XLA,
#             peak device memory)
#   official  the seed release's unfold method in PyTorch, per layer and the
#             whole step, with peak memory (official_torch.json)
#   dw        filter-gradient formulations (cuDNN FP32, TF32, 3xTF32, per-tap
#             matmuls at FP32 and bf16x6): time and error against float64
#             (filter_grad.json)
#   tune      block-size sweep of both kernels over the ResNet-20 layers
#             (tune.json); the longest stage, so it runs last
#   report    the markdown tables for benchmarks/RESULTS.md (report.md)
#
# Each stage runs under its own time limit (STAGE_TIMEOUT seconds, default
# 420) and appends to RESULTS_DIR/session.log, so a stage that fails or runs
# out of time costs only itself. RESULTS_DIR defaults to $OUT (the device
# tool's output folder) or ./gpu_results. QUICK=1 runs every stage at toy
# sizes (a check of the script on any machine; its figures mean nothing;
# the step stages then use LeNet-5-BN).
# The device image lacks ml_collections: carry .whl from
# benchmarks/gpu_wheels.sh (gpu_prepare.sh installs it and checks the
# imports before the first stage). benchmarks/gpu_diagnose.sh is the
# one-call alternative: the goal table plus compiled-kernel dumps and ptxas
# figures within one device call.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_results}}
shift || true
STAGES=${*:-check floor ops step official dw tune report}
mkdir -p "$RESULTS"
LOG="$RESULTS/session.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_prepare.sh
. benchmarks/gpu_prepare.sh
SCRATCH=$(mktemp -d /tmp/addernet_session.XXXXXX)
# carried wheels, import check (in this shell: it exports PYTHONPATH)
gpu_prepare "$SCRATCH" >"$SCRATCH/prepare.log" 2>&1
tee -a "$LOG" <"$SCRATCH/prepare.log"
STAGE_TIMEOUT=${STAGE_TIMEOUT:-420}

if [[ "${QUICK:-0}" == 1 ]]; then
  BATCH=2; STEPS=2; REPS=1; CANDIDATES=1; FLOOR_ARGS="--elements 65536 --steps 8 --copy_mb 4 --reps 2"
  OPS_LAYERS="--layers 0,5"; TUNE_LAYERS="--layers s3_3x3_64-64"
  STEP_MODEL=lenet5_bn; STEP_ARGS="--num_train 32 --num_test 16"
else
  BATCH=256; STEPS=20; REPS=10; CANDIDATES=0; FLOOR_ARGS=""; OPS_LAYERS=""; TUNE_LAYERS=""
  STEP_MODEL=resnet20; STEP_ARGS=""
fi

stage() {  # stage NAME COMMAND...: run one stage under the time limit, log it.
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout --kill-after=20 "$STAGE_TIMEOUT" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

peaks() {  # ops.py's --peak_* flags from floor.json, when the floor stage ran.
  [[ -f "$RESULTS/floor.json" ]] || return 0
  "$PY" - "$RESULTS/floor.json" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"--peak_gflops {f['instr_per_s_used'] / 1e9:.1f} "
      f"--peak_gbps {f['memory']['bytes_per_s'] / 1e9:.1f}")
EOF
}

for name in $STAGES; do
  case $name in
    check)
      stage versions "$PY" -c "import sys, jax, jaxlib, flax, optax, numpy; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__); print(jax.devices())"
      stage nvidia-smi nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      stage tests "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_kernels.py tests/test_ops.py ;;
    floor)
      # shellcheck disable=SC2086
      stage floor "$PY" benchmarks/floor.py --batch "$BATCH" $FLOOR_ARGS --out "$RESULTS/floor.json" ;;
    ops)
      # shellcheck disable=SC2086
      stage ops-triton "$PY" benchmarks/ops.py --batch "$BATCH" --repeats "$REPS" --implementations xla,pallas $OPS_LAYERS $(peaks) --jsonl "$RESULTS/ops.jsonl"
      # shellcheck disable=SC2086
      ADDERNET_GPU_KERNELS=mosaic stage ops-mosaic "$PY" benchmarks/ops.py --batch "$BATCH" --repeats "$REPS" --implementations pallas $OPS_LAYERS $(peaks) --jsonl "$RESULTS/ops.jsonl" ;;
    step)
      for variant in "adder pallas triton" "adder pallas mosaic" "adder xla triton" "mult xla triton"; do
        set -- $variant
        # shellcheck disable=SC2086
        ADDERNET_GPU_KERNELS=$3 stage "step-$1-$2-$3" "$PY" benchmarks/train_step.py --model "$STEP_MODEL" --conv "$1" --implementation "$2" --batch "$BATCH" --steps "$STEPS" $STEP_ARGS --jsonl "$RESULTS/step.jsonl"
      done ;;
    official)
      if [[ "${QUICK:-0}" == 1 ]]; then extra="--warmup 1 --reps 1"; else extra=""; fi
      # shellcheck disable=SC2086
      stage official "$PY" benchmarks/official_torch.py --batch "$BATCH" $extra --out "$RESULTS/official_torch.json" ;;
    dw)
      stage dw "$PY" benchmarks/filter_grad.py --batch "$BATCH" --reps "$REPS" --out "$RESULTS/filter_grad.json" ;;
    tune)
      # shellcheck disable=SC2086
      stage tune "$PY" benchmarks/tune_kernels.py --batch "$BATCH" --reps "$REPS" --max_candidates "$CANDIDATES" $TUNE_LAYERS $( [[ -f "$RESULTS/floor.json" ]] && echo --floor "$RESULTS/floor.json" ) --out "$RESULTS/tune.json" ;;
    report)
      stage report "$PY" benchmarks/report.py "$RESULTS" --out "$RESULTS/report.md" ;;
    *)
      echo "unknown stage '$name' (stages: check floor ops step official dw tune report)" | tee -a "$LOG"
      exit 2 ;;
  esac
done
echo "results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
