#!/usr/bin/env bash
# Compile-check every csrc/*.cu (and csrc/*.cpp) against torch's headers with nvcc/g++,
# without a GPU and without linking. Usage: bash scripts/check-csrc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CUDA_HOME:=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
NVCC="$CUDA_HOME/bin/nvcc"
# the wrapper on PATH may hide the real toolkit root: resolve it from the wrapper's target
if [ ! -f "$CUDA_HOME/lib64/libcudart.so" ]; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" | head -n 1 || true)
  CUDA_HOME=$(dirname "$(dirname "$real")"); NVCC="$real"
fi
TORCH_INC=$(.venv/bin/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PY_INC=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
# the CPU torch wheel lacks this generated header; an empty stub is enough to compile
mkdir -p "$stub/c10/cuda/impl"
echo "#pragma once" > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  echo "nvcc -c $f"
  "$NVCC" -std=c++17 -arch=sm_90a -O2 -c "$f" -o "$stub/$(basename "$f").o" \
    -I"$stub" -Icsrc $TORCH_INC -I"$PY_INC" -DTORCH_EXTENSION_NAME=fastdia_check -diag-suppress 3306
done
for f in csrc/*.cpp; do
  [ -e "$f" ] || continue
  echo "g++ -c $f"
  g++ -std=c++17 -O1 -fsyntax-only -Wno-c++20-extensions "$f" -I"$stub" -Icsrc $TORCH_INC -I"$PY_INC" \
    -I"$CUDA_HOME/include" -DTORCH_EXTENSION_NAME=fastdia_check
done
