#!/usr/bin/env bash
# Installs ffcompile and everything it needs into a virtual environment, .venv in this checkout, on a
# fresh Debian/Ubuntu machine with Python >= 3.10 (stock Debian's pip refuses system-wide installs).
#   bash tools/setup.sh          # the package, torch (CPU), onnx, onnxruntime, TVM
#   bash tools/setup.sh --tests  # also pytest, the aarch64 cross compiler and qemu-user (ARM emulation tests)
# Then `. .venv/bin/activate`, or call .venv/bin/ffcompile and .venv/bin/python directly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/pip ]] && ! "$PYTHON" -m venv .venv; then
  # Debian and Ubuntu ship venv's pip bootstrap in a separate package
  SUDO=""; [[ "$(id -u)" -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -q && $SUDO apt-get install -y -q python3-venv
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
# torch first, at the tested version; see docs/install.md for CPU-only wheels on other machines.
"$PY" -m pip install -q "${FFCOMPILE_TORCH:-torch==2.13.0}"
if [[ "${1:-}" == "--tests" ]]; then
  "$PY" -m pip install -q -e ".[full,dev]"
  bash .ci/install_emulation.sh
else
  "$PY" -m pip install -q -e ".[full]"
fi
echo "ffcompile installed in .venv: $("$PY" -m ffcompile --version)"
echo "use it with: . .venv/bin/activate"
