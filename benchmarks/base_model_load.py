"""Time loading the embedded default base model: first (dequantise + cache) and cached.

Each load runs in a fresh Python process, so the cached time includes nothing a previous
load left in memory; the import of torch/transformers is timed separately.

    .venv/bin/python benchmarks/base_model_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import write_result

_CHILD = """
import json, time
t0 = time.perf_counter()
import torch, transformers
from fastdia.base_model import load_base_model
t1 = time.perf_counter()
load_base_model()
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def _load(cache: str) -> dict[str, float]:
    env = {**os.environ, "FASTDIA_CACHE": cache}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = _load(cache)
        cached = [_load(cache) for _ in range(args.repeats)]
    result = {
        "first_load_s": first["load_s"],
        "cached_load_s": sorted(c["load_s"] for c in cached),
        "import_torch_transformers_s": sorted(c["import_s"] for c in cached),
        "note": "load_s: load_base_model() in a fresh process after torch and transformers "
        "are imported (tokenizer + embedding matrix + fingerprint; the LM itself loads lazily "
        "on first use of BaseModel.model); first = dequantise the GGUF and write the cache",
    }
    print(json.dumps(result, indent=2))
    write_result("cpu_base_model_load", result)


if __name__ == "__main__":
    main()
