"""The planned loop is graph-safe (DESIGN §2), checked on the CPU and the meta device.

After ``plan()``, :meth:`SamplerPlan.denoise` must create no tensor from host values,
read nothing back to the host and touch no tensor off the plan's device:
:class:`fastdia.strict.GraphSafeMode` fails on any of these. The same loop on the
``meta`` device catches a tensor made without ``device=`` (it would land on the CPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdia import noise
from fastdia.decode import DECODE_STEP, DecodeConfig, LMDecoder
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.ops.guided_step import TokenLocalStack, guided_step_reference
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.strict import GraphSafeMode, GraphSafetyError

PROMPT = "The movie was"


def _denoiser(space, **kw) -> Denoiser:
    torch.manual_seed(0)
    cfg = DenoiserConfig(dim=space.dim, max_length=16, hidden=16, layers=1, heads=2, **kw)
    return Denoiser(cfg).eval()


def _critic(space, kind: str = "token_local"):
    torch.manual_seed(1)
    extra = {"heads": 2, "layers": 1} if kind == "context" else {}
    return build_critic(
        CriticConfig(dim=space.dim, kind=kind, hidden=8, reward="sentiment", **extra)
    ).eval()


# (denoiser options, sampler options, with a context critic)
CASES = {
    "eps-noised-prompt": ({}, {"sampler": "dia", "guidance": 2.0}, False),
    "clean-selfcond": ({"clean_prompt": True, "self_condition": True}, {"guidance": 1.0}, False),
    "x0-clamp-corrector-kappa-stop": (
        {"prediction": "x0", "self_condition": True},
        {
            "sampler": "ddpm",
            "guidance": 1.5,
            "clamp_from": 2,
            "corrector_steps": 1,
            "noise_kappa": 0.3,
            "stop_at": 0.2,
            "rounding": "inner",
        },
        False,
    ),
    "adaln-ddim-context-critic": ({"arch": "adaln"}, {"sampler": "ddim", "guidance": 1.0}, True),
}


def _sampler(space, case: str, device: str = "cpu") -> Sampler:
    den_kw, cfg_kw, context = CASES[case]
    critics = [WeightedCritic("sentiment", _critic(space), 1.0)]
    if context:
        critics.append(WeightedCritic("nontoxic", _critic(space, "context"), 0.5))
    config = SamplerConfig(steps=3, backend="reference", **cfg_kw)
    return Sampler(_denoiser(space, **den_kw), space, critics, config, device=device)


def test_mode_fails_on_factory_ops_host_reads_and_other_devices():
    x = torch.ones(3)
    with GraphSafeMode("cpu"):
        y = torch.zeros_like(x) + x * 2.0  # derived from a tensor, arithmetic: allowed
        for bad in (
            lambda: torch.zeros(3),
            lambda: torch.full((), 7),
            lambda: torch.arange(3),
            lambda: torch.tensor(1.5),
            lambda: x.new_zeros(2),
            lambda: torch.randn(2),
            lambda: y.sum().item(),
            lambda: float(y[0]),
            lambda: bool(y[0] > 0),
            lambda: y.nonzero(),
            lambda: y.to("meta"),
        ):
            with pytest.raises(GraphSafetyError):
                bad()
    meta = torch.ones(3, device="meta")
    with GraphSafeMode("meta"):
        torch.zeros_like(meta).add_(meta)
        with pytest.raises(GraphSafetyError, match="is on cpu"):
            meta + x
    with GraphSafeMode("cpu", raise_errors=False) as mode:
        torch.zeros(2)
        torch.ones(2).sum().item()
    assert len(mode.violations) == 3 and "aten.zeros" in mode.violations[0]

    def timestep_embedding():  # an allowed function: factory ops inside it pass
        return torch.arange(3)

    with GraphSafeMode("cpu", allow_factories_in=("timestep_embedding",)):
        timestep_embedding()
        with pytest.raises(GraphSafetyError):
            torch.arange(3)


def test_noise_from_device_seed_matches_the_integer_seed():
    """Seed and step read from tensors give the very same numbers (the Philox words are
    the same), with no factory op and no host read."""
    index = torch.arange(0, 4000, 7).view(4, -1)
    seed, step, shape = torch.tensor(123), torch.tensor(45), torch.empty(3, 5, 11)
    with GraphSafeMode("cpu"):
        got = noise.randn_at(seed, step, index)
        like = noise.randn_like(seed, step, shape)
    assert torch.equal(got, noise.randn_at(123, 45, index))
    assert torch.equal(got.view(-1), noise.randn(123, 45, 4000)[index.view(-1)])
    assert torch.equal(like, noise.randn(123, 45, 165).view(3, 5, 11))
    assert int(seed) == 123 and int(step) == 45  # the caller's tensors are not modified


def test_reference_step_is_graph_safe_with_device_counters():
    torch.manual_seed(0)
    z, eps = torch.randn(6, 5), torch.randn(6, 5)
    stack = TokenLocalStack(torch.randn(4, 5), torch.randn(4), torch.randn(4), torch.randn(()))
    kw = {"seq_len": 3, "critic": stack, "noise_kappa": 0.2, "return_h": True}
    coef = torch.tensor([[1.0, -0.2, 0.3, 0.5], [0.9, 0.1, 0.2, 0.4]])
    want, want_h = guided_step_reference(z, eps, coef, seed=5, step=2, guidance=1.5, **kw)
    seed, step, lam = torch.tensor(5), torch.tensor(2), torch.tensor(1.5)
    out, h_out = torch.full_like(z, float("nan")), torch.full((2,), float("nan"))
    with GraphSafeMode("cpu"):
        got, h = guided_step_reference(
            z, eps, coef, seed=seed, step=step, guidance=lam, out=out, h_out=h_out, **kw
        )
    assert got is out and h is h_out
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)


def _mode(device: str, case: str) -> GraphSafeMode:
    """The strict mode for a case. A context critic computes its time features in the loop
    (fastdia.models.common.timestep_embedding: a constant frequency table from ``arange``,
    the same on every replay); factory ops are allowed there and nowhere else."""
    allowed = ("timestep_embedding",) if CASES[case][2] else ()
    return GraphSafeMode(device, allow_factories_in=allowed)


@pytest.mark.parametrize("fixed_length", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_planned_loop_is_graph_safe_on_cpu(tiny_base, case, fixed_length):
    """No factory op, host read or foreign device in the loop; it gives what run() gives.

    ``fixed_length`` is the variant a CUDA graph captures (prompt positions by the mask
    alone); the eager one re-noises a prompt at its positions only."""
    s = _sampler(tiny_base.space, case)
    plan = s.plan(2, 8)
    plan.fixed_length = fixed_length
    plan.set_inputs(PROMPT, 3)
    with _mode("cpu", case) as mode:
        plan.denoise()
    assert mode.ops  # the loop ran under the mode
    ids, z = plan.ids.clone(), plan.z.clone()
    out = plan.run(PROMPT, seed=3)
    assert torch.equal(out.token_ids, ids) and torch.equal(out.z, z)
    # the output owns its tensors: the next run reuses the plan's buffers
    assert out.token_ids.data_ptr() != plan.ids.data_ptr()
    # a new seed and a new prompt reach the loop through the buffers
    plan.set_inputs("I", 4)
    with _mode("cpu", case):
        plan.denoise()
    assert not torch.equal(plan.z, z)


def _to_meta(space, sampler_case: str) -> Sampler:
    meta_space = dataclasses.replace(space, weight=space.weight.to("meta"))
    return _sampler(meta_space, sampler_case, device="meta")


@pytest.mark.parametrize("fixed_length", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_planned_loop_runs_on_the_meta_device(tiny_base, case, fixed_length):
    """Plan and loop with every tensor on ``meta``: one made without ``device=`` fails."""
    plan = _to_meta(tiny_base.space, case).plan(2, 8)
    plan.fixed_length = fixed_length
    plan.set_inputs(PROMPT, 3)
    with _mode("meta", case):
        plan.denoise()
    assert plan.z.device.type == "meta" and plan.z.shape == (2, 8, tiny_base.space.dim)
    assert plan.ids.device.type == "meta" and plan.ids.shape == (2, 8)


def test_fixed_length_prompt_noise_equals_the_eager_draw(tiny_base):
    """The captured variant draws the re-noised prompt's noise over all L positions with
    the step op; the eager one at the prompt's positions only: the same numbers."""
    plan = _sampler(tiny_base.space, "eps-noised-prompt").plan(2, 8)
    eager = plan.run(PROMPT, seed=7)
    plan.fixed_length = True
    fixed = plan.run(PROMPT, seed=7)
    assert torch.equal(eager.z, fixed.z) and torch.equal(eager.token_ids, fixed.token_ids)


def test_lm_decode_plan_loop_is_graph_safe(tiny_base, tiny_models):
    """With decode="lm" the diffusion loop stays graph-safe (the decode runs after it)."""
    denoiser, critic = tiny_models
    cfg = SamplerConfig(steps=3, guidance=1.0, decode="lm", stop_at=0.5, lm=DecodeConfig())
    critics = [WeightedCritic("sentiment", critic)]
    plan = Sampler(denoiser, tiny_base.space, critics, cfg, base_model=tiny_base).plan(2, 8)
    plan.set_inputs(PROMPT, 1)
    with GraphSafeMode("cpu"):
        plan.denoise()


# factory ops the LM decode step may run: transformers' constants (position ranges, mask
# fill values) and the reference Gumbel draw's fixed counters and output
DECODE_CONSTANTS = {
    "allow_factories_from": ("transformers",),
    "allow_factories_in": ("gumbel_argmax", "sample_vocab_reference"),
}


@pytest.mark.parametrize(("latent_weight", "once"), [(0.0, False), (0.5, True)])
def test_lm_decode_step_is_graph_safe(tiny_base, tiny_models, latent_weight, once):
    """The LM decode's per-token step with a static KV cache: no host read, nothing off
    the device, no factory op outside the constants above; the counters advance on the
    device."""
    _, critic = tiny_models
    cfg = DecodeConfig(latent_weight=latent_weight, tilt=1.0, tilt_once=once)
    plan = LMDecoder(tiny_base, cfg, {}).plan(2, 8, 0.3, [(critic, 1.0)], 0.5)
    assert plan.static
    z = torch.randn(2, 8, tiny_base.space.dim)
    prompt = torch.tensor(tiny_base.space.encode(PROMPT))
    p = len(prompt)
    plan._start_run(z, prompt, 3)
    with GraphSafeMode("cpu", **DECODE_CONSTANTS):
        for _ in range(p, 8):
            plan.step()
    assert plan.out_pos.tolist() == [8] and plan.cache_pos.tolist() == [7]
    assert int(plan.noise_step) == DECODE_STEP + 8
    # the strict mode does see a step that reads a counter back to the host
    with pytest.raises(GraphSafetyError, match="host"), GraphSafeMode("cpu", **DECODE_CONSTANTS):
        int(plan.out_pos)


def test_cuda_graph_option_is_inert_off_cuda(tiny_base, tiny_models):
    denoiser, _ = tiny_models
    for flag in (True, False):
        plan = Sampler(denoiser, tiny_base.space, [], SamplerConfig(steps=2, cuda_graph=flag))
        assert not plan.plan(1, 4).graphed
    assert SamplerConfig().cuda_graph is True


def test_triton_wrapper_is_graph_safe_with_device_scalars(monkeypatch):
    """The Triton guided_step's host side (kernel launch stubbed out) creates nothing when
    seed, step and guidance are device tensors and ``out`` is given, as the sampler
    passes them; Python numbers cost a ``torch.full`` each."""
    kernels = pytest.importorskip("fastdia.kernels.guided_step")
    launches = []

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    monkeypatch.setattr(kernels, "_guided_step_kernel", _Stub())
    z = torch.zeros(6, 5)
    stack = TokenLocalStack(torch.ones(4, 5), torch.ones(4), torch.ones(4), torch.ones(()))
    coef = torch.ones(4)
    kw = {"seq_len": 3, "critic": stack, "out": torch.empty_like(z)}
    seed, step, lam = torch.tensor(1), torch.tensor(2), torch.tensor(0.5)
    with GraphSafeMode("cpu"):
        kernels.guided_step(z, z, coef, seed=seed, step=step, guidance=lam, **kw)
    with GraphSafeMode("cpu", raise_errors=False) as mode:
        kernels.guided_step(z, z, coef, seed=1, step=2, guidance=0.5, **kw)
    assert len(launches) == 2
    assert sum("aten.full" in v for v in mode.violations) == 3
