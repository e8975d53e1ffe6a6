"""The fused backends end to end: the whole sampler on each gives the reference backend's
tokens (``triton`` on the CPU under the interpreter, ``cuda`` on a GPU), the CLI samples
with ``--backend triton``, and on a GPU ``auto`` follows a real ``fastdia profile --record``.

The ops themselves are checked variant by variant in tests/test_guided_step.py,
tests/test_round_to_vocab.py and tests/test_sample_vocab.py; the sampler on a GPU with
every backend, eager and as CUDA graphs, in tests/test_sampler_cuda.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from variants import CPU, CUDA, load

from fastdia import ops
from fastdia.cli import main
from fastdia.ops import registry

pytestmark = [  # numpy noise from the Triton interpreter
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

# backends whose sampler keeps the reference's tokens to the last bit of the state's
# tolerance: Triton in its interpreter (fp32), the cuda kernels (fp32-level 3xTF32)
SAMPLER_BACKENDS = [
    pytest.param("triton", CPU, id="triton-cpu"),
    pytest.param("cuda", CUDA, id="cuda-cuda", marks=pytest.mark.cuda),
]


def _load(backend: str, device: str) -> None:
    """Skip unless ``backend`` runs every sampler op on ``device`` (see tests/variants.py)."""
    for op in ops.SAMPLER_OPS:
        load(op, backend, device)


@pytest.mark.parametrize("sampler", ["dia", "ddpm"])
@pytest.mark.parametrize(("backend", "device"), SAMPLER_BACKENDS)
def test_sampler_gives_the_reference_tokens(tiny_base, tiny_models, backend, device, sampler):
    from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic

    _load(backend, device)
    denoiser, critic = tiny_models
    outs = {}
    try:
        for name in ("reference", backend):
            cfg = SamplerConfig(sampler=sampler, steps=4, guidance=2.0, backend=name)
            s = Sampler(
                denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, device=device
            )
            assert s.backends == {op: name for op in ops.SAMPLER_OPS}
            outs[name] = s.sample(2, 10, prompt="The movie was", seed=3)
    finally:
        tiny_base.space.to("cpu")  # the session fixture's space was moved in place
    ref, got = outs["reference"], outs[backend]
    assert torch.equal(got.token_ids, ref.token_ids)
    assert got.texts == ref.texts
    torch.testing.assert_close(got.z, ref.z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("backend", "device"), SAMPLER_BACKENDS)
def test_sampler_with_adaptive_noise_and_clamping(tiny_base, tiny_models, backend, device):
    from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic

    _load(backend, device)
    denoiser, critic = tiny_models
    outs = {}
    try:
        for name in ("reference", backend):
            cfg = SamplerConfig(
                steps=3,
                guidance=1.0,
                noise_kappa=0.5,
                clamp_from=2,
                corrector_steps=1,
                backend=name,
            )
            s = Sampler(
                denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, device=device
            )
            outs[name] = s.sample(2, 8, seed=1)
    finally:
        tiny_base.space.to("cpu")
    assert torch.equal(outs[backend].token_ids, outs["reference"].token_ids)


def test_cli_sample_with_triton_backend(tiny_model_dir, capsys):
    _load("triton", CPU)
    code = main(
        [
            "sample",
            "--base-model",
            str(tiny_model_dir),
            "--random-init",
            "--backend",
            "triton",
            "--length",
            "8",
            "--steps",
            "2",
            "--num-samples",
            "1",
            "--json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    summary = lines[-1]["summary"]
    assert summary["backend"] == "triton" and summary["steps"] == 2
    assert len(lines) == 2 and len(lines[0]["completion_ids"]) <= 8


@pytest.mark.cuda
def test_measured_auto_follows_a_real_profile(tmp_path, monkeypatch):
    from fastdia.ops import measured

    _load("cuda", CUDA)
    monkeypatch.delenv("FASTDIA_BACKEND", raising=False)
    monkeypatch.setenv(measured.PROFILE_ENV, str(tmp_path / "profile.json"))
    out = tmp_path / "prof.json"
    assert main(["profile", "--quick", "--device", CUDA, "--out", str(out), "--record"]) == 0
    results = json.loads(Path(measured.profile_path()).read_text())["devices"]
    results = results[measured.device_name(CUDA)]
    for op in ops.SAMPLER_OPS:
        assert {"cuda", "reference"} <= set(results[op]["ms"])
        assert registry.resolve_backend("auto", op, CUDA) == results[op]["fastest"]
