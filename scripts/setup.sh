#!/usr/bin/env bash
# Set up flextok-at-scale on a fresh Debian/Ubuntu machine: OS packages for the demo data,
# a virtualenv in .venv, PyTorch (CPU build when there is no NVIDIA GPU), the project and its extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
APT_PACKAGES="fonts-noto-color-emoji unicode-data dataset-fashion-mnist python3-venv"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] installing OS packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null

# PyTorch: a CUDA build where an NVIDIA GPU is present, otherwise the CPU build. Set TORCH_SPEC or
# PIP_EXTRA_INDEX_URL (e.g. the PyTorch CPU wheel index) to choose another build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    TORCH_SPEC="${TORCH_SPEC:-torch>=2.4}"
  else
    TORCH_SPEC="${TORCH_SPEC:-torch==2.13.*}"
  fi
  echo "[setup] installing $TORCH_SPEC"
  $PIP install -q "$TORCH_SPEC"
fi

echo "[setup] installing flextok-at-scale with extras [text,dev]"
$PIP install -q -e ".[text,dev]"
echo "[setup] done: .venv/bin/flextok --help"
