"""The whole sampler on a CUDA GPU, every backend, eager and as a replayed CUDA graph.

Skipped without a GPU (``cuda`` marker). Triton kernels must run natively: run with
``TRITON_INTERPRET=0`` (``tests/conftest.py`` turns the interpreter on unless the variable
is set)::

    TRITON_INTERPRET=0 python -m pytest tests/test_sampler_cuda.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdia.device import triton_interpreting
from fastdia.errors import ConfigError
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.ops import SAMPLER_OPS, registry
from fastdia.ops.round_to_vocab_ref import rounding_mismatches
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.strict import GraphSafeMode

pytestmark = pytest.mark.cuda

DEV = "cuda"
PROMPT = "The movie was"
BACKENDS = ("reference", "triton", "cuda")


def _models(space, *, context: bool = False, **den_kw):
    """A fresh denoiser and critics on the CPU (the same weights on every call)."""
    torch.manual_seed(0)
    cfg = DenoiserConfig(dim=space.dim, max_length=32, hidden=32, layers=2, heads=2, **den_kw)
    den = Denoiser(cfg).eval()
    critic = build_critic(CriticConfig(dim=space.dim, hidden=16, reward="sentiment")).eval()
    critics = [WeightedCritic("sentiment", critic, 1.0)]
    if context:
        ctx = CriticConfig(
            dim=space.dim, kind="context", hidden=16, heads=2, layers=1, reward="nontoxic"
        )
        critics.append(WeightedCritic("nontoxic", build_critic(ctx).eval(), 0.5))
    return den, critics


def _space_on(space, device: str):
    """A copy of ``space`` on ``device`` (Sampler moves its space in place)."""
    return dataclasses.replace(space, weight=space.weight.to(device))


def _backend_or_skip(backend: str) -> None:
    if backend == "triton" and triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 for native Triton kernels")
    try:
        for op in SAMPLER_OPS:
            registry.resolve_backend(backend, op, torch.device(DEV))
    except ConfigError as exc:
        pytest.skip(str(exc))


def _sampler(space, backend: str, device: str, *, graph: bool, context=False, **kw) -> Sampler:
    den_kw = kw.pop("den_kw", {})
    den, critics = _models(space, context=context, **den_kw)
    kw = {"block_size": 4, **kw}  # several blocks per run: the graph replays once per block
    config = SamplerConfig(steps=6, backend=backend, cuda_graph=graph, **kw)
    return Sampler(den, _space_on(space, device), critics, config, device=device)


SETTINGS = {
    "dia-eps-noised-prompt": ({}, {"sampler": "dia", "guidance": 2.0}),
    "ddpm-clean-selfcond-clamp": (
        {"clean_prompt": True, "self_condition": True},
        {"sampler": "ddpm", "guidance": 1.0, "clamp_from": 5},
    ),
    "ddim-x0-stop": ({"prediction": "x0"}, {"sampler": "ddim", "stop_at": 0.1}),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_replay_equals_eager_and_follows_its_inputs(tiny_base, backend, setting):
    _backend_or_skip(backend)
    den_kw, kw = SETTINGS[setting]
    space = tiny_base.space
    graphed = _sampler(space, backend, DEV, graph=True, den_kw=den_kw, **kw).plan(3, 12)
    eager = _sampler(space, backend, DEV, graph=False, den_kw=den_kw, **kw).plan(3, 12)
    assert graphed.graphed and not eager.graphed
    a, b = graphed.run(PROMPT, seed=5), eager.run(PROMPT, seed=5)
    assert a.blocks == 3
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-5)
    p = len(space.encode(PROMPT))
    assert a.token_ids[:, :p].tolist() == [space.encode(PROMPT)] * 3
    # a new seed, then a new prompt, reach the replay through the static buffers
    c = graphed.run(PROMPT, seed=6)
    assert not torch.equal(a.z, c.z)
    d = graphed.run("I love it", seed=5)
    assert not torch.equal(a.z, d.z)
    torch.testing.assert_close(d.z, eager.run("I love it", seed=5).z, rtol=1e-5, atol=1e-5)
    again = graphed.run(PROMPT, seed=5)
    assert torch.equal(again.token_ids, a.token_ids) and torch.equal(again.z, a.z)


def test_graph_with_a_context_critic(tiny_base):
    """An autograd context critic inside the loop: the replay equals the eager loop."""
    space = tiny_base.space
    kw = {"guidance": 1.0, "context": True}
    graphed = _sampler(space, "reference", DEV, graph=True, **kw).plan(2, 10)
    eager = _sampler(space, "reference", DEV, graph=False, **kw).plan(2, 10)
    a, b = graphed.run(PROMPT, seed=2), eager.run(PROMPT, seed=2)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_gives_the_cpu_tokens(tiny_base, backend):
    """Same seed, same prompt: the GPU's token ids are the CPU reference's, except where
    the two best tokens are a near tie of float rounding."""
    _backend_or_skip(backend)
    space = tiny_base.space
    # one block of the whole window: the tokens are the rounding of the final state
    kw = {"guidance": 1.0, "sampler": "ddpm", "window": 16, "block_size": 16}
    cpu = _sampler(space, "reference", "cpu", graph=False, **kw).sample(4, 16)
    gpu = _sampler(space, backend, DEV, graph=True, **kw).sample(4, 16)
    torch.testing.assert_close(gpu.z.cpu(), cpu.z, rtol=1e-3, atol=1e-3)
    bias = space.rounding_bias("l2")
    differing, beyond = rounding_mismatches(
        cpu.z, space.weight, bias, gpu.tokens, cpu.tokens, rel_tol=1e-3
    )
    assert beyond == 0, f"{differing} tokens differ, {beyond} beyond a near tie"


def test_block_loop_on_the_gpu_is_graph_safe(tiny_base):
    """The reference blocks on CUDA under the strict mode: no host read, no factory op,
    nothing off the device."""
    s = _sampler(tiny_base.space, "reference", DEV, graph=False, guidance=1.0)
    plan = s.plan(2, 8, prompt_tokens=4)
    plan.set_inputs([s.encode(PROMPT), []], [3, 4])
    with GraphSafeMode(DEV):
        plan.diffusion.denoise()
        plan.diffusion.denoise()
    torch.cuda.synchronize()
    z = plan.diffusion.z
    assert z.is_cuda and torch.isfinite(z).all()


def test_graph_replay_is_faster_than_the_eager_loop_at_batch_one(tiny_base):
    """docs/design.md §5: at B = 1 launch overhead dominates; the replay must at least win."""
    _backend_or_skip("triton")
    space = tiny_base.space
    graphed = _sampler(space, "triton", DEV, graph=True, guidance=1.0).plan(1, 16)
    eager = _sampler(space, "triton", DEV, graph=False, guidance=1.0).plan(1, 16)
    times = {}
    for name, plan in (("graph", graphed), ("eager", eager)):
        plan.run(PROMPT, seed=0)
        times[name] = min(plan.run(PROMPT, seed=s).seconds for s in range(1, 6))
    assert times["graph"] < times["eager"], times


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lm_decode_graph_equals_eager(tiny_model_dir, backend):
    """decode="lm" on the GPU: the diffusion loop and the per-token decode step are both
    captured; the replay gives the eager tokens, and follows a new seed or prompt."""
    from fastdia.base_model import load_base_model
    from fastdia.decode import DecodeConfig

    _backend_or_skip(backend)
    base = load_base_model(str(tiny_model_dir), device=DEV)
    den, critics = _models(base.space)
    lm = DecodeConfig(latent_weight=0.5, tilt=1.0)
    plans = {}
    for graph in (True, False):
        config = SamplerConfig(
            steps=6,
            backend=backend,
            cuda_graph=graph,
            decode="lm",
            stop_at=0.5,
            lm=lm,
            block_size=4,
        )
        sampler = Sampler(den, base.space, critics, config, device=DEV, base_model=base)
        plans[graph] = sampler.plan(3, 12)
    graphed, eager = plans[True], plans[False]
    assert graphed.graphed and graphed.decode_plan.graphed and graphed.decode_plan.static
    assert not eager.decode_plan.graphed
    a, b = graphed.run(PROMPT, seed=5), eager.run(PROMPT, seed=5)
    assert torch.equal(a.token_ids, b.token_ids)
    assert not torch.equal(graphed.run(PROMPT, seed=6).token_ids, a.token_ids)
    d = graphed.run("I love it", seed=5)
    assert torch.equal(d.token_ids, eager.run("I love it", seed=5).token_ids)
    assert torch.equal(graphed.run(PROMPT, seed=5).token_ids, a.token_ids)
    # ragged prompts in one batch: each row as in its own batch, replayed
    rows = [PROMPT, "I love it so much, it is a happy film", None]
    mixed = graphed.run(rows, seed=[5, 6, 7])
    for i, row in enumerate(rows):
        alone = eager.run([row] * 3, seed=[5 + i] * 3)
        assert torch.equal(alone.tokens[0], mixed.tokens[i])
