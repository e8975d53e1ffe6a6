#!/usr/bin/env bash
# One-command GPU check of the cuda backend (csrc/), from the repository root on a machine
# with an NVIDIA GPU of compute capability >= 8.0, a CUDA build of torch, the CUDA toolkit
# (nvcc, CUDA_HOME) and ninja:
#
#   bash scripts/gpu-check.sh
#
# 1. loads the extension (prebuilt, or built just in time and cached), 2. runs every test
# marked `cuda`: first the per-op files (tests/test_guided_step.py, tests/test_round_to_vocab.py,
# tests/test_sample_vocab.py: every variant on the GPU against the references, awkward shapes,
# poisoned outputs, dtypes, ties, noise, CUDA graphs, torch.compile), then the rest of tests/
# (the sampler on every backend, eager and as CUDA graphs, auto after a real profile),
# 3. runs compute-sanitizer memcheck, racecheck and synccheck over the cuda backend's kernels
# through scripts/cuda_sanitize.py (the per-op files' cuda-marked every-path tests of the
# cuda backend), 4. times every variant (`fastdia profile`: a table against the
# device's measured bandwidth and matmul rate) and prints which one `auto` would take
# (fastdia profile --from FILE; with --record the choice is
# recorded and `auto` follows it). Exits non-zero on the first failure.
# Environment: PYTHON (default .venv/bin/python, else python3), FASTDIA_CUDA_JIT=1 to ignore
# a prebuilt extension, FASTDIA_CUDA_ARCH_LIST to build for other archs.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 (the CPU interpreter)

echo "gpu-check: loading the extension"
"$PY" - <<'EOF'
import logging
import sys

import torch

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA device is visible")
from fastdia.ops import cuda_ops

cuda_ops.load()
logging.getLogger("gpu-check").info("extension loaded on %s", torch.cuda.get_device_name())
EOF

OP_TESTS=(tests/test_guided_step.py tests/test_round_to_vocab.py tests/test_sample_vocab.py)
echo "gpu-check: tests marked cuda: every variant of each op against the reference"
"$PY" -m pytest -m cuda -q -p no:cacheprovider "${OP_TESTS[@]}"
echo "gpu-check: tests marked cuda: the rest (sampler, profile)"
ignore=()
for f in "${OP_TESTS[@]}"; do ignore+=(--ignore "$f"); done
"$PY" -m pytest -m cuda -q -p no:cacheprovider "${ignore[@]}" tests/

SAN=$(command -v compute-sanitizer || true)
if [ -z "$SAN" ]; then
  home=${CUDA_HOME:-$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')")}
  SAN="$home/bin/compute-sanitizer"
fi
[ -x "$SAN" ] || { echo "gpu-check: compute-sanitizer not found (CUDA_HOME/bin)" >&2; exit 1; }
for tool in memcheck racecheck synccheck; do
  echo "gpu-check: compute-sanitizer --tool $tool (the per-op cuda tests, scripts/cuda_sanitize.py)"
  # one cudaMalloc per tensor, so that memcheck sees out-of-bounds accesses
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 \
    "$PY" scripts/cuda_sanitize.py
done
echo "gpu-check: timings of every variant (fastdia profile) and auto's choice (not recorded)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m fastdia.cli profile --full --out "$work/profile.json"
"$PY" -m fastdia.cli profile --from "$work/profile.json"
echo "gpu-check: all passed in $(( $(date +%s) - start )) s"
