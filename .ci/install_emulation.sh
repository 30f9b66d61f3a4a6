#!/usr/bin/env bash
# Host tools for running aarch64 artifacts under emulation (ffcompile.emulation).
# Idempotent and non-interactive; needs root (or sudo). Safe to run on every CI start:
# it does nothing but a quick check when everything is already installed.
set -euo pipefail

# program -> Debian package that provides it
declare -A NEED=(
  [aarch64-linux-gnu-gcc]=gcc-aarch64-linux-gnu
  [aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu
  [qemu-aarch64]=qemu-user
  [dpkg-deb]=dpkg
  [apt-get]=apt
)
# packages with no program to probe for
ALWAYS=(debian-archive-keyring ca-certificates)

missing=()
for prog in "${!NEED[@]}"; do
  command -v "$prog" >/dev/null 2>&1 || missing+=("${NEED[$prog]}")
done
for pkg in "${ALWAYS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install_emulation: host tools already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
echo "install_emulation: installing ${missing[*]}"
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user \
  binutils-aarch64-linux-gnu libc6-dev-arm64-cross \
  debian-archive-keyring ca-certificates
for prog in "${!NEED[@]}"; do
  command -v "$prog" >/dev/null 2>&1 || { echo "install_emulation: $prog still missing" >&2; exit 1; }
done
echo "install_emulation: done"
