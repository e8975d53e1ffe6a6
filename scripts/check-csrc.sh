#!/usr/bin/env bash
# Compile-check the CUDA C++ sources without a GPU and without linking, warnings as errors:
# every csrc/*.cu with nvcc for sm_90 (device and host code, with the flags torch's extension
# builder adds), and every csrc/*.cpp with the host compiler. The compiles run in parallel;
# any failure fails the script. Usage: bash scripts/check-csrc.sh
# Environment: CUDA_HOME (the toolkit root; default: found from nvcc on PATH), PYTHON (the
# interpreter whose torch headers are used; default .venv/bin/python), CSRC_ARCH (default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-.venv/bin/python}
ARCH=${CSRC_ARCH:-90}
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || true)
  if [ -z "$nvcc_path" ]; then
    echo "check-csrc: no nvcc on PATH and CUDA_HOME unset: install the CUDA toolkit" >&2
    exit 1
  fi
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
fi
# a wrapper script on PATH may hide the real toolkit root: resolve it from the wrapper's target
if [ ! -f "$CUDA_HOME/lib64/libcudart.so" ] && [ -n "${nvcc_path:-}" ]; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$nvcc_path" | head -n 1 || true)
  if [ -n "$real" ]; then CUDA_HOME=$(dirname "$(dirname "$real")"); fi
fi
NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || { echo "check-csrc: $NVCC not found (set CUDA_HOME)" >&2; exit 1; }

# torch's include folders as system headers (their warnings are not ours), and the nvcc flags
# torch.utils.cpp_extension adds to every CUDA source.
mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print('-isystem'); print(p)")
mapfile -t TORCH_NVCC < <("$PY" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
print('\n'.join(COMMON_NVCC_FLAGS))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the CPU torch wheel lacks this generated header; an empty stub is enough to compile
mkdir -p "$work/stub/c10/cuda/impl"
echo "#pragma once" > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
COMMON=(-std=c++17 -isystem "$work/stub" "${TORCH_INC[@]}" -isystem "$PY_INC" -Icsrc
  -DTORCH_EXTENSION_NAME=fastdia_check -DTORCH_API_INCLUDE_EXTENSION_H)

names=()
pids=()
for f in csrc/*.cu csrc/*.cpp; do
  [ -e "$f" ] || continue
  base=$(basename "$f")
  case "$f" in
    *.cu)
      cmd=("$NVCC" "${COMMON[@]}" "${TORCH_NVCC[@]}" -O2 -lineinfo
        -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -Werror all-warnings
        -Xcompiler -Wall,-Wextra,-Werror -c "$f" -o "$work/$base.o") ;;
    *.cpp)
      cmd=(g++ "${COMMON[@]}" -isystem "$CUDA_HOME/include" -O1 -Wall -Wextra -Werror
        -fsyntax-only "$f") ;;
  esac
  echo "check-csrc: ${cmd[0]##*/} $f"
  "${cmd[@]}" > "$work/$base.log" 2>&1 &
  names+=("$f")
  pids+=($!)
done
if [ "${#names[@]}" -eq 0 ]; then
  echo "check-csrc: no sources in csrc/"
  exit 0
fi
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=1
    echo "check-csrc: FAILED ${names[$i]}" >&2
  fi
  log="$work/$(basename "${names[$i]}").log"
  if [ -s "$log" ]; then cat "$log" >&2; fi
done
echo "check-csrc: ${#names[@]} files in $(( $(date +%s) - start )) s"
exit "$failed"
