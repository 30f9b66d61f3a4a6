#!/usr/bin/env bash
# The paper runs beyond feed-forward MNIST for one GPU command, side by side on one GPU: the
# recurrent MNIST net (sec. 3.4, 60 epochs, goal 1.31 %), figure 5 at paper size (3 x 2000,
# full-batch updates of 22,320 predictions, four regimes) and, when a CIFAR-10 binary folder is
# given, table 1's four FF trainings (sec. 4). Every run checkpoints each epoch and resumes, so
# runs cut by LIMIT keep their curves and running the command again continues them.
#   bash bench/gpu_recurrent_text_runs.sh MNIST_DIR RESULTS_DIR [LIMIT_SECONDS] [CIFAR_DIR]
set -u
DATA=${1:?MNIST dir}; OUT=${2:?results dir}; LIMIT=${3:-500}; CIFAR=${4:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
timeout "$LIMIT" python3 bench/bench_paper_mnist.py --experiment recurrent --data-dir "$DATA" --device cuda \
  --out "$OUT/recurrent.json" --run-dir "$OUT/recurrent.run" > "$OUT/recurrent.log" 2>&1 &
timeout "$LIMIT" python3 bench/bench_text.py --device cuda --epochs 200 --runs "$OUT/text.runs" \
  --out "$OUT/text.json" --no-progress > "$OUT/text.log" 2>&1 &
if [ -n "$CIFAR" ]; then
  timeout "$LIMIT" python3 bench/bench_cifar.py --data-dir "$CIFAR" --device cuda --out "$OUT/cifar.json" --run-root "$OUT/cifar.runs" \
    > "$OUT/cifar.log" 2>&1 &
fi
wait
nvidia-smi --query-gpu=name,memory.used --format=csv || true
