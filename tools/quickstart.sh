#!/usr/bin/env bash
# The main job on the built-in MNIST subset: train → eval → build → verify → run → finetune.
# Every step is a plain ffcompile command; set FFCOMPILE_DATA_DIR to use the full MNIST instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/ffcompile ]]; then PATH="$PWD/.venv/bin:$PATH"; fi  # the environment tools/setup.sh made
OUT=${1:-runs/quickstart}
TARGET=${TARGET:-x86-cpu}
EPOCHS=${EPOCHS:-10}
rm -rf "$OUT"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
step ffcompile train models/mnist-small.toml --out "$OUT/run" --epochs "$EPOCHS"
step ffcompile eval "$OUT/run"
step ffcompile build "$OUT/run" --target "$TARGET" -o "$OUT/bundle"
step ffcompile verify "$OUT/bundle"
step ffcompile run "$OUT/bundle"
step ffcompile finetune "$OUT/bundle" --epochs 1 --out "$OUT/finetuned"
step ffcompile run "$OUT/bundle" --weights "$OUT/finetuned/checkpoint.safetensors"
printf '\nDone. Plots: %s/run/curves.png, %s/run/receptive_fields.png; bundle: %s/bundle\n' "$OUT" "$OUT" "$OUT"
