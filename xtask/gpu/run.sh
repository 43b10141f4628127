#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in one go, on a CUDA machine that has no Rust toolchain: it runs
# binaries built elsewhere (`xtask/gpu/build.sh` puts them, compressed, into .gpu/ with the data
# they need) and writes every figure under $OUT (default gpu-out/).
#
#   bash xtask/gpu/run.sh            # everything (about 9 minutes on an H200)
#   GPU_REAL_S=60 bash xtask/gpu/run.sh
#
# Steps, each one on its own (a failure is recorded and the next step runs), the cheapest first:
#   tiny      a few-kilobyte model on CUDA against the CPU (seconds): the driver, cuBLAS and the
#             kernels load and compute; the script stops here if this fails
#   check     the fixture checkpoint's evaluation forward, a phase-2 and a phase-3 loss with all
#             their gradients, CUDA against CPU and the fixture (device_check)
#   predict   `dsr predict --raw` of the demo model on the demo test images, on CUDA and on the
#             CPU; maps and scores compared
#   bench     ours and anomalib 2.7.0's PyTorch model (wheels in .gpu/wheels) on the same GPU:
#             inference at batch 1, 8, 32, phase-2 and phase-3 steps at batch 8, 256x256, with
#             the peak GPU memory of each process (nvidia-smi, sampled every 20 ms)
#   codebook  phase 1 on the pool of freely licensed images in .gpu/pool (small and reference
#             widths), for the shipped general codebooks
#   real      magnetic_tile (.gpu/magnetic_tile), reference model, 256x256: phases 2 and 3 for
#             about GPU_REAL_S seconds (default 120) on the reference-width codebook, then the test
#
# GPU_STEPS (default all) runs some of them: e.g. GPU_STEPS="check codebook" (tiny always runs).
set -uo pipefail
want() { [ -z "${GPU_STEPS:-}" ] || [[ " $GPU_STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
G=.gpu
WORK=/tmp/dsr-gpu
mkdir -p "$WORK"
SUMMARY="$OUT/summary.txt"
BENCH_OUT=$OUT/bench.jsonl
: >"$SUMMARY"
t0=$(date +%s)

step() { # step NAME COMMAND...: runs it, records seconds and exit status
  local name=$1
  shift
  local s
  s=$(date +%s.%N)
  echo "=== $name: $* ($(date -u +%T), $(($(date +%s) - t0)) s into the run)"
  "$@"
  local rc=$?
  printf '%-18s rc=%d %s s\n' "$name" "$rc" "$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" |
    tee -a "$SUMMARY"
  return $rc
}

# --- binaries and libraries ------------------------------------------------------------------
for f in "$G"/*.xz; do
  [ -e "$f" ] || continue
  xz -dc "$f" >"$WORK/$(basename "$f" .xz)"
  chmod +x "$WORK/$(basename "$f" .xz)"
done
DSR=$WORK/dsr
CHECK=$WORK/device_check
BENCH=$WORK/bench
# cuBLAS, cuBLASLt, cuRAND and NVRTC of CUDA 13, found in the toolkit or in the Python wheels,
# under the plain names the binaries look for (libcuda comes with the driver).
LIBS=$WORK/lib
mkdir -p "$LIBS"
for lib in cublas cublasLt curand nvrtc; do
  found=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/lib/x86_64-linux-gnu \
    "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)/nvidia" \
    -name "lib$lib.so.1[0-9]*" 2>/dev/null | sort | tail -n 1)
  [ -n "$found" ] && ln -sf "$found" "$LIBS/lib$lib.so" && echo "lib$lib: $found"
done
cp "$G/libcudart_stub.so" "$LIBS/"
export LD_LIBRARY_PATH=$LIBS:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/gpu.txt"

# --- tiny ------------------------------------------------------------------------------------
if ! step tiny timeout 120 "$CHECK" --tiny; then
  echo "the tiny CUDA check failed: stopping"
  exit 1
fi

# --- check -----------------------------------------------------------------------------------
if want check; then
step check timeout 240 "$CHECK" --fixture crates/dsr-core/tests/fixtures/small \
  >"$OUT/device_check.txt" 2>&1
tail -n 30 "$OUT/device_check.txt" | cut -c1-200 | grep -v '^{' || true
fi

# --- predict ---------------------------------------------------------------------------------
if want predict; then
# The demo model: carried in .gpu/demo.safetensors, else trained here by `dsr demo` on CUDA.
DEMO=$G/demo.safetensors
if [ ! -f "$DEMO" ]; then
  step demo-cuda timeout 180 "$DSR" demo --device cuda --results "$WORK/demo" >"$OUT/demo.log" 2>&1
  tail -n 25 "$OUT/demo.log"
  DEMO=$(find "$WORK/demo" -name model.safetensors | head -n 1)
fi
predict() {
  timeout 240 "$DSR" predict --model "$DEMO" assets/demo/battery_weld/test/* \
    --raw --device "$1" --out "$WORK/predict-$1" >"$WORK/predict-$1.log" 2>&1
  tail -n 3 "$WORK/predict-$1.log"
}
step predict-cpu predict cpu
step predict-cuda predict cuda
step predict-compare python3 xtask/gpu/compare_predictions.py "$WORK/predict-cpu" \
  "$WORK/predict-cuda" | tee "$OUT/predict_compare.txt"
fi

# --- bench -----------------------------------------------------------------------------------
if want bench; then
: >"$BENCH_OUT"
peak_mem() { # peak_mem LOGFILE COMMAND...: the command's stdout last line, then its GPU peak
  local log=$1
  shift
  local base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"$log" &
  local smi=$!
  "$@"
  local rc=$?
  kill $smi 2>/dev/null
  wait $smi 2>/dev/null
  echo "gpu_peak_mib=$(sort -n "$log" | tail -n 1) gpu_base_mib=$base"
  return $rc
}
if ls "$G"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$G"/wheels/*.whl && export PYTHONPATH=$WORK/site
fi
BENCH_OUT=$OUT/bench.jsonl
for c in "infer 1 10" "infer 8 5" "infer 32 3" "phase2 8 5" "phase3 8 5"; do
  set -- $c
  for side in ours torch; do
    if [ $side = ours ]; then
      cmd=("$BENCH" "$1" --batch "$2" --size 256 --repeat "$3" --device cuda)
    else
      cmd=(python3 xtask/bench/torch_reference.py "$1" --batch "$2" --size 256 --repeat "$3"
        --device cuda)
    fi
    res=$WORK/out-$side-$1-$2.txt
    step "$side-$1-$2" peak_mem "$WORK/smi-$side-$1-$2.txt" timeout 180 "${cmd[@]}" \
      >"$res" 2>"$WORK/err-$side-$1-$2.txt"
    json=$(grep '^{' "$res" | tail -n 1)
    mem=$(grep -o 'gpu_peak_mib=[0-9]* gpu_base_mib=[0-9]*' "$res" | tail -n 1)
    echo "$side $1 batch $2: $mem $json"
    if [ -n "$json" ]; then
      echo "{\"side\":\"$side\",\"smi\":\"$mem\",\"result\":$json}" >>"$BENCH_OUT"
    else
      tail -n 5 "$WORK/err-$side-$1-$2.txt"
    fi
  done
done
fi

# --- codebook --------------------------------------------------------------------------------
if want codebook; then
# The phase-1 step time is measured on a few steps first, then the steps that fit the budget run.
pretrain_for() { # pretrain_for PRESET SECONDS OUT
  local s t steps
  s=$(date +%s.%N)
  "$DSR" pretrain --images "$G/pool" --preset "$1" --steps 100 --device cuda \
    --out "$WORK/probe-$1.safetensors" >/dev/null 2>&1 || return 1
  t=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  steps=$(python3 -c "print(max(100, int(($2 - 2) / max($t, 0.5) * 100)))")
  echo "phase 1 $1: 100 steps in $t s (setup included): $steps steps for about $2 s"
  "$DSR" pretrain --images "$G/pool" --preset "$1" --steps "$steps" --device cuda --seed 0 \
    --out "$3" 2>&1 | tail -n 3
}
step codebook-small pretrain_for small "${GPU_SMALL_S:-30}" "$OUT/vq_small.safetensors"
step codebook-reference pretrain_for reference "${GPU_REF_S:-75}" "$WORK/vq_reference.safetensors"
if [ -f "$WORK/vq_reference.safetensors" ]; then
  # Half precision for the way back (the f32 file is above the 16 MB a returned file may have).
  python3 xtask/gpu/to_f16.py "$WORK/vq_reference.safetensors" "$OUT/vq_reference_f16.safetensors"
fi
fi

# --- real ------------------------------------------------------------------------------------
if want real; then
real_run() {
  local t2 t3 n2 n3
  touch "$BENCH_OUT"
  t2=$(grep '"phase2"' "$BENCH_OUT" | grep '"side":"ours"' | grep -o '"median_s":[0-9.e-]*' | cut -d: -f2)
  t3=$(grep '"phase3"' "$BENCH_OUT" | grep '"side":"ours"' | grep -o '"median_s":[0-9.e-]*' | cut -d: -f2)
  local budget=${GPU_REAL_S:-120}
  n2=$(python3 -c "print(max(10, int(0.7 * $budget / ${t2:-1})))")
  n3=$(python3 -c "print(max(5, int(0.3 * $budget / ${t3:-1})))")
  echo "real run: phase 2 $n2 steps (${t2:-?} s each), phase 3 $n3 steps (${t3:-?} s each)"
  local vq=(--vq-weights "$WORK/vq_reference.safetensors")
  [ -f "$WORK/vq_reference.safetensors" ] || vq=(--pretrain --pretrain-steps 300)
  timeout 420 "$DSR" train --data "$G/magnetic_tile" --device cuda --image-size 256,256 \
    "${vq[@]}" --phase2-steps "$n2" --phase3-steps "$n3" \
    --batch 8 --seed 0 --checkpoint-every 100000 --results "$WORK/results" 2>&1 |
    grep -v '^\s*$' | tail -n 40
  local run
  run=$(find "$WORK/results" -name metrics.json | head -n 1)
  [ -n "$run" ] && cp "$run" "$OUT/real_metrics.json" &&
    cp "$(dirname "$run")/metrics.jsonl" "$OUT/real_steps.jsonl"
}
step real real_run
fi

echo "=== done in $(($(date +%s) - t0)) s"
cat "$SUMMARY"
