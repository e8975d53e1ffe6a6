"""fastdia: a fused-kernel sampler for diffusion-based inference-time alignment.

``import fastdia`` is lean: it imports neither torch nor transformers, initialises no
CUDA, builds no extension and loads no model. The names below resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Generator": "fastdia.generate",
    "Generation": "fastdia.generate",
    "GenerateResult": "fastdia.generate",
    "load_base_model": "fastdia.base_model",
    "wrap_base_model": "fastdia.base_model",
    "BaseModel": "fastdia.base_model",
    "EmbeddingSpace": "fastdia.embedding",
    "Sampler": "fastdia.sampler",
    "SamplerConfig": "fastdia.sampler",
    "DecodeConfig": "fastdia.decode",
    "SampleOutput": "fastdia.sample_output",
    "WeightedCritic": "fastdia.sampler",
    "sample_rows": "fastdia.sampler",
    "build_sampler": "fastdia.pipeline",
    "load_checkpoint": "fastdia.models.checkpoint",
    "save_checkpoint": "fastdia.models.checkpoint",
    "Denoiser": "fastdia.models.denoiser",
    "DenoiserConfig": "fastdia.models.denoiser",
    "CriticConfig": "fastdia.models.critic",
    "build_critic": "fastdia.models.critic",
    "build_rewards": "fastdia.rewards",
    "coefficient_table": "fastdia.schedules",
    "FastdiaError": "fastdia.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdia' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
