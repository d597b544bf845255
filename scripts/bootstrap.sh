#!/usr/bin/env bash
# Set up (idempotently) everything `make demo` / `make test` need, saying what it does:
#   a virtual environment ($VENV, default .venv), torch ($TORCH, default 2.14.1) with the matching
#   torchvision (and triton 3.6.0 for torch 2.11.0, the oldest supported pair), and the editable
#   build of rectok_fast with its dev extras (C++ extension; CUDA kernels too where nvcc exists).
# Re-running skips every step that is already done; a changed TORCH, setup.py or pyproject.toml
# redoes the steps that depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${TORCH:-2.14.1}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

case "$TORCH" in
  2.11.*) VISION=0.26.0; EXTRA="triton==3.6.0" ;;
  2.12.*) VISION=0.27.0; EXTRA="" ;;
  2.13.*) VISION=0.28.0; EXTRA="" ;;
  2.14.*) VISION=0.29.1; EXTRA="" ;;
  *) VISION=""; EXTRA="" ;;
esac

say() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'

stamp_torch="$VENV/.rectok-torch-$TORCH"
if [ ! -f "$stamp_torch" ]; then
  say "installing torch==$TORCH ${VISION:+torchvision==$VISION }$EXTRA (a CUDA build of torch is several GB: minutes on a bare machine)"
  "$PY" -m pip install -q --upgrade pip setuptools wheel ninja
  # shellcheck disable=SC2086
  "$PY" -m pip install -q "torch==$TORCH" ${VISION:+"torchvision==$VISION"} $EXTRA
  rm -f "$VENV"/.rectok-torch-* "$VENV"/.rectok-build-*
  touch "$stamp_torch"
fi

build_key=$(cat setup.py pyproject.toml csrc/* | "$PY" -c 'import hashlib, sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest()[:12])')
stamp_build="$VENV/.rectok-build-$build_key"
if [ ! -f "$stamp_build" ] || ! "$PY" -c 'import rectok_fast._C' 2>/dev/null; then
  say "building rectok_fast (editable, with the C++/CUDA extension and the dev extras)"
  "$PY" -m pip install -q -e ".[dev]" --no-build-isolation
  rm -f "$VENV"/.rectok-build-*
  touch "$stamp_build"
fi
ready=$("$PY" - <<'PY'
import torch

import rectok_fast

i = rectok_fast.build_info()
print(f"torch {torch.__version__}, triton {i['triton_version']}, C++ extension {i['cpu_extension']}, "
      f"CUDA kernels compiled {i['cuda_extension_compiled']}")
PY
)
say "ready: $ready"
