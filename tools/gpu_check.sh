#!/usr/bin/env bash
# GPU bundles in one short run (< 10 min): build the `cuda` (onnxruntime-gpu) and `cuda-tvm` (TVM
# CUDA) bundles of models/mnist-small.toml with fresh weights -- the build runs the parity check
# (programs + a 20-step trajectory) on the GPU -- then `ffcompile verify` (100 steps) and
# `ffcompile run` each. A target whose runtime is missing is reported and skipped; the exit
# status is non-zero if any attempted target fails.
#   bash tools/gpu_check.sh [OUT_DIR] [DATA_DIR]
# Needs: an NVIDIA GPU; onnxruntime-gpu (CUDAExecutionProvider) for `cuda`; an apache-tvm whose
# runtime has CUDA enabled for `cuda-tvm` (the CPU-only wheel compiles CUDA bundles but cannot run them).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}; DATA=${2:-}
DATA_OPT=(); [ -n "$DATA" ] && DATA_OPT=(--data-dir "$DATA")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU (nvidia-smi failed)"; exit 1; }
have_ort_cuda=$(python3 -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null || echo 0)
have_tvm_cuda=$(python3 -c "import tvm; print(int(tvm.cuda(0).exist))" 2>/dev/null || echo 0)
status=0
check() {  # check TARGET
  local t=$1 b="$OUT/small-$1"
  echo "== $t: build (parity at build: 20 steps)"
  timeout 240 python3 -m ffcompile build models/mnist-small.toml --target "$t" -o "$b" --verify-steps 20 \
      --no-progress "${DATA_OPT[@]}" || { echo "== $t: build FAILED"; status=1; return; }
  echo "== $t: verify (100 steps)"
  timeout 180 python3 -m ffcompile verify "$b" --steps 100 --report "$OUT/$t.parity.json" --no-progress \
      "${DATA_OPT[@]}" || { echo "== $t: verify FAILED"; status=1; }
  echo "== $t: run (test split)"
  timeout 60 python3 -m ffcompile run "$b" "${DATA_OPT[@]}" || { echo "== $t: run FAILED"; status=1; }
}
if [ "$have_ort_cuda" = 1 ]; then check cuda; else echo "== cuda: SKIPPED (onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu)"; fi
if [ "$have_tvm_cuda" = 1 ]; then check cuda-tvm; else echo "== cuda-tvm: SKIPPED (needs an apache-tvm runtime with CUDA enabled)"; fi
[ "$have_ort_cuda" = 1 ] || [ "$have_tvm_cuda" = 1 ] || status=1
exit $status
