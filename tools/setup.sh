#!/usr/bin/env bash
# Installs ffcompile and everything it needs on a fresh Debian/Ubuntu machine with Python >= 3.10.
#   bash tools/setup.sh          # the package, torch (CPU), onnx, onnxruntime, TVM
#   bash tools/setup.sh --tests  # also pytest, the aarch64 cross compiler and qemu-user (ARM emulation tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first, at the tested version; see docs/install.md for CPU-only wheels on other machines.
"$PYTHON" -m pip install -q "${FFCOMPILE_TORCH:-torch==2.13.0}"
if [[ "${1:-}" == "--tests" ]]; then
  "$PYTHON" -m pip install -q -e ".[full,dev]"
  bash .ci/install_emulation.sh
else
  "$PYTHON" -m pip install -q -e ".[full]"
fi
echo "ffcompile installed: $("$PYTHON" -m ffcompile --version)"
