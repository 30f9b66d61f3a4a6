#!/usr/bin/env bash
# Installs ffcompile and everything it needs on a fresh Debian/Ubuntu machine with Python >= 3.10.
#   bash tools/setup.sh          # the package, torch (CPU), onnx, onnxruntime, TVM
#   bash tools/setup.sh --tests  # also pytest, the aarch64 cross compiler and qemu-user (ARM emulation tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch 2.13.0 CPU: pinned because this version's wheel is cached locally here; others download GBs.
"$PYTHON" -m pip install -q torch==2.13.0
if [[ "${1:-}" == "--tests" ]]; then
  "$PYTHON" -m pip install -q -e ".[dev]"
  bash .ci/install_emulation.sh
else
  "$PYTHON" -m pip install -q -e .
fi
echo "ffcompile installed: $("$PYTHON" -m ffcompile --version)"
