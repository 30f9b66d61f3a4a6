#!/usr/bin/env bash
# The paper's MNIST benchmarks for one GPU command, run side by side on one GPU (each run is small for
# a modern GPU, so they share it well): a 4-configuration sweep of the supervised 4x2000 network
# (sec. 3.3, 60 epochs) plus the unsupervised, local-receptive-field and jittered experiments.
# Every run checkpoints and writes metrics.json each epoch, so runs cut by LIMIT keep their curves.
#   bash bench/gpu_paper_runs.sh DATA_DIR RESULTS_DIR [LIMIT_SECONDS]
set -u
DATA=${1:?MNIST dir}; OUT=${2:?results dir}; LIMIT=${3:-500}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout "$LIMIT" python3 bench/sweep.py --script bench/bench_paper_supervised.py --out-dir "$OUT/supervised" --parallel 4 \
  --config 'adam-wd1e-3=' \
  --config 'adam-wd1e-4=regularizers.weight_decay=1e-4' \
  --config 'adam-lr3e-4=optimizer.lr=3e-4;regularizers.weight_decay=1e-4' \
  --config 'sgd-lr1e-3=optimizer={kind="sgd",lr=1e-3,momentum=0.9};regularizers.weight_decay=3e-4' \
  -- --data-dir "$DATA" --device cuda > "$OUT/supervised.log" 2>&1 &
for exp in "unsupervised --epochs 60" local "jitter --epochs 60"; do
  timeout "$LIMIT" python3 bench/bench_paper_mnist.py --experiment $exp --data-dir "$DATA" --device cuda \
    --out "$OUT/${exp%% *}.json" --run-dir "$OUT/${exp%% *}.run" > "$OUT/${exp%% *}.log" 2>&1 &
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv || true
