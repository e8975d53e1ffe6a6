"""Shared fixtures: tiny real-format base models, random models, the real default model."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# backend="auto" must not follow a user's stored measurements (fastdia.ops.measured)
os.environ.setdefault("FASTDIA_PROFILE", os.path.join(os.devnull, "fastdia-profile.json"))

import pytest
import torch
from tiny import build_tiny_llama


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``cuda`` when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny random Llama and its BPE tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir):
    """The tiny model loaded through the same loader as real models."""
    from fastdia.base_model import load_base_model

    return load_base_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def default_base():
    """The real embedded default base model (about 20 s the first time, then cached)."""
    from fastdia.base_model import load_base_model

    return load_base_model()


@pytest.fixture
def tiny_models(tiny_base):
    """A small random denoiser and a token-local critic over the tiny space."""
    from fastdia.models.critic import CriticConfig, build_critic
    from fastdia.models.denoiser import Denoiser, DenoiserConfig

    torch.manual_seed(0)
    dim = tiny_base.space.dim
    denoiser = Denoiser(DenoiserConfig(dim=dim, max_length=32, hidden=32, layers=1, heads=2))
    critic = build_critic(CriticConfig(dim=dim, hidden=16, reward="sentiment"))
    return denoiser.eval(), critic.eval()
