#!/usr/bin/env bash
# One device call that measures the kernels and explains them, from the
# repository root:
#
#     bash benchmarks/gpu_diagnose.sh [OUT_DIR]
#
# Everything lands in OUT_DIR (default $OUT, the device tool's output folder,
# else ./diag_results) as at most seven files, so that all of it comes back
# from one call of the device tool (8 files, 16 MiB each, at most):
#
#   diagnose.log     every stage's command, output, exit code and seconds
#   report.md        benchmarks/report.py: the goal table and every measured
#                    figure, each row with what ran and its check against XLA
#   summary.md       per kernel: build status and compile time, ptxas
#                    registers / spills / stack / shared memory; every stage's
#                    exit and time; dispatch fallbacks found in the log
#   ptxas.txt        raw `ptxas -v` of every PTX file (and Mosaic GPU's own)
#   results.tar.gz   the stages' JSON (floor, tune, step, ops, kernels, ptxas)
#   dumps.tar.gz     Pallas kernel jaxprs and Triton IR (TTIR), PTX, XLA's
#                    dumps (HLO after optimisation, module PTX), Mosaic GPU's
#                    (MLIR passes, PTX, ptxas, SASS); trimmed to 15 MiB
#
# Stages, in order of value, each under its own time limit and all under one
# budget (DIAG_BUDGET seconds, default 450: the device tool allows 600 s a
# call and a session 15 minutes, start-up included), so that a slow or failing
# stage costs only itself and what it wrote survives (results and log are
# copied to OUT_DIR after every stage):
#
#   env      versions, nvidia-smi (clocks, memory), ptxas version
#   floor    FP32 instruction rate, copy bandwidth, each layer's floor
#   tune     the heuristic tile of each kernel (Triton, Triton SIMT, and the
#            Mosaic GPU forward on Hopper) on all 7 ResNet-20 layers,
#            checked against the reference, then timed (the kernel goals)
#   dump     every kernel built alone with dumps on (benchmarks/diagnose.py)
#   ptxas    registers, spills, stack, shared memory per kernel function
#   step     the real ResNet-20 training step and per-epoch evaluation at
#            batch 256: adder with the Triton kernels, then the CNN
#   ops      per layer, forward and forward+backward against cuDNN (while
#            budget is left)
#   report   report.md, summary.md and the archives (a reserve of the budget)
#
# QUICK=1 runs every stage at toy sizes: a dry run of the script on any
# machine (on a CPU the kernels are lowered for CUDA, not compiled; no PTX),
# its figures meaningless. DIAG_WORK names the scratch folder (default a new
# one under /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-diag_results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=${DIAG_WORK:-$(mktemp -d /tmp/addernet_diag.XXXXXX)}
RES=$WORK/results
DUMP=$WORK/dumps
mkdir -p "$RES" "$DUMP"
LOG=$OUT_DIR/diagnose.log
: >"$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PY
# shellcheck source=benchmarks/gpu_prepare.sh
. benchmarks/gpu_prepare.sh
START=$SECONDS
RESERVE=${DIAG_RESERVE:-30}

SCALE=1  # stage limits are multiplied by this (interpret mode is slow)
if [[ "${QUICK:-0}" == 1 ]]; then
  BUDGET=${DIAG_BUDGET:-1500}; SCALE=4
  BATCH=2; STEPS=1; REPS=1
  FLOOR_ARGS="--elements 65536 --steps 8 --copy_mb 4 --reps 2"
  TUNE_LAYERS="--layers s3_1x1_32-64_s2"
  DUMP_LAYERS="--layers s1_3x3_16-16,s3_1x1_32-64_s2"
  OPS_LAYERS="--layers 6"
  STEP_MODEL=lenet5_bn; STEP_ARGS="--num_train 32 --num_test 16"
else
  BUDGET=${DIAG_BUDGET:-450}
  BATCH=256; STEPS=20; REPS=10
  FLOOR_ARGS=""; TUNE_LAYERS=""; DUMP_LAYERS=""; OPS_LAYERS=""
  STEP_MODEL=resnet20; STEP_ARGS=""
fi

left() { echo $(( BUDGET - (SECONDS - START) - RESERVE )); }

save() {  # the stages' JSON and the log so far, into OUT_DIR
  tar -czf "$OUT_DIR/results.tar.gz.tmp" -C "$WORK" results 2>/dev/null &&
    mv "$OUT_DIR/results.tar.gz.tmp" "$OUT_DIR/results.tar.gz"
}

stage() {  # stage NAME CAP_SECONDS COMMAND...: run under min(cap, budget left)
  local name=$1 cap=$(( $2 * SCALE )); shift 2
  local limit
  limit=$(left)
  (( limit > cap )) && limit=$cap
  if (( limit < 15 )); then
    echo "=== $name: skipped, $(left) s of the budget left" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  save
  return 0
}

peaks() {  # ops.py's --peak_* flags from floor.json, when the floor stage ran.
  [[ -f "$RES/floor.json" ]] || return 0
  "$PY" - "$RES/floor.json" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"--peak_gflops {f['instr_per_s_used'] / 1e9:.1f} "
      f"--peak_gbps {f['memory']['bytes_per_s'] / 1e9:.1f}")
EOF
}

env_info() {
  "$PY" -c "import sys, jax, jaxlib, flax, optax, numpy; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__); print(jax.devices())"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 || true
  local ptxas
  ptxas=$("$PY" -c "from benchmarks import diagnose; print(diagnose.find_ptxas() or '')" 2>/dev/null)
  echo "ptxas: ${ptxas:-not found}"
  [[ -n "$ptxas" ]] && "$ptxas" --version
  return 0
}

pack_dumps() {
  "$PY" benchmarks/diagnose.py pack "$DUMP" "$OUT_DIR/dumps.tar.gz" --max_mb 15
  [[ -f "$DUMP/ptxas.txt" ]] && cp "$DUMP/ptxas.txt" "$OUT_DIR/ptxas.txt"
  for f in kernels.json ptxas.json; do
    [[ -f "$DUMP/$f" ]] && cp "$DUMP/$f" "$RES/$f"
  done
  return 0
}

echo "gpu_diagnose: budget ${BUDGET} s (reserve ${RESERVE} s), batch ${BATCH}, out ${OUT_DIR}, scratch ${WORK}" | tee -a "$LOG"
# carried wheels, import check (in this shell: it exports PYTHONPATH)
gpu_prepare "$WORK" >"$WORK/prepare.log" 2>&1
tee -a "$LOG" <"$WORK/prepare.log"
export -f env_info
stage env 30 bash -c env_info
# shellcheck disable=SC2086
stage floor 60 "$PY" benchmarks/floor.py --batch "$BATCH" $FLOOR_ARGS --out "$RES/floor.json"
# shellcheck disable=SC2086
stage tune 120 "$PY" benchmarks/tune_kernels.py --batch "$BATCH" --reps "$REPS" --max_candidates 1 --families gpu,triton_simt $TUNE_LAYERS $( [[ -f "$RES/floor.json" ]] && echo --floor "$RES/floor.json" ) --out "$RES/tune.json"
# shellcheck disable=SC2086
XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$DUMP/xla --xla_dump_hlo_as_text" \
  MOSAIC_GPU_DUMP_TO="$DUMP/mosaic" \
  stage dump 120 "$PY" benchmarks/diagnose.py dump "$DUMP" --batch "$BATCH" $DUMP_LAYERS
mkdir -p "$DUMP/mosaic"
stage ptxas 45 "$PY" benchmarks/diagnose.py ptxas "$DUMP"
pack_dumps >>"$LOG" 2>&1; save
# shellcheck disable=SC2086
ADDERNET_GPU_KERNELS=triton stage step-adder-pallas-triton 160 "$PY" benchmarks/train_step.py --model "$STEP_MODEL" --conv adder --implementation pallas --batch "$BATCH" --steps "$STEPS" $STEP_ARGS --jsonl "$RES/step.jsonl"
# shellcheck disable=SC2086
stage step-mult-xla 80 "$PY" benchmarks/train_step.py --model "$STEP_MODEL" --conv mult --implementation xla --batch "$BATCH" --steps "$STEPS" $STEP_ARGS --no-check --jsonl "$RES/step.jsonl"
# shellcheck disable=SC2086
stage ops 300 "$PY" benchmarks/ops.py --batch "$BATCH" --repeats "$REPS" --implementations xla,pallas $OPS_LAYERS $(peaks) --jsonl "$RES/ops.jsonl"

# The reserve: report, summary and archives (no stage limit eats into it).
RESERVE=0
stage report 20 "$PY" benchmarks/report.py "$RES" --out "$OUT_DIR/report.md"
pack_dumps >>"$LOG" 2>&1
timeout 20 "$PY" benchmarks/diagnose.py summary "$DUMP" --log "$LOG" --out "$OUT_DIR/summary.md" >/dev/null 2>>"$LOG"
save
echo "gpu_diagnose: done after $((SECONDS - START)) s; in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')" | tee -a "$LOG"
