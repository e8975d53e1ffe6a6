"""Build script.

Metadata lives in pyproject.toml. This file exists for the ahead-of-time build of the
CUDA C++ extension ``fastdia._C_cuda`` from ``csrc/`` (the source list and compiler flags
are those of the just-in-time build, shared through ``fastdia/ops/cuda_build.py``).

It is built when the build environment has a CUDA build of torch and a CUDA toolkit
(``CUDA_HOME`` or ``nvcc`` found), i.e. with ``pip install --no-build-isolation .`` on such a
machine; the archs come from ``$FASTDIA_CUDA_ARCH_LIST`` (else ``$TORCH_CUDA_ARCH_LIST``,
else the visible GPUs, else 8.0, 8.6, 8.9 and 9.0+PTX). Otherwise, or with
``FASTDIA_SKIP_CUDA_BUILD=1``, fastdia installs as pure Python with one warning, and the
``cuda`` backend builds the extension just in time on first use.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_build_module() -> Any:
    """``fastdia/ops/cuda_build.py`` loaded by path (fastdia itself is not importable here)."""
    spec = importlib.util.spec_from_file_location(
        "_fastdia_cuda_build", ROOT / "fastdia" / "ops" / "cuda_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension() -> dict[str, Any]:
    """``setup()`` arguments for the prebuilt extension, or none (with one warning)."""
    build = _cuda_build_module()
    reason = build.aot_skip_reason()
    if reason is not None:
        warnings.warn(
            f"fastdia: installing without the prebuilt CUDA extension ({reason}); the cuda "
            "backend builds it just in time on first use",
            stacklevel=1,
        )
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(build.aot_arch_list())
    extension = CUDAExtension(
        name=build.PREBUILT_MODULE,
        sources=[f"csrc/{name}" for name in build.SOURCES],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": build.cxx_flags(), "nvcc": build.nvcc_flags()},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
