"""Zeroth-order guidance (fastdia.zeroth_order): the antithetic estimator against known
gradients, the directions' per-row seeding, the sampler under it, bad settings."""

from __future__ import annotations

import json

import pytest
import torch

from fastdia.cli import main
from fastdia.errors import ConfigError
from fastdia.models.denoiser import Denoiser, DenoiserConfig
from fastdia.sampler import Sampler, SamplerConfig
from fastdia.zeroth_order import (
    SHORTLIST,
    antithetic_gradient,
    check_zero_order,
    nearest_tokens,
    round_among,
    step_directions,
)

PROMPT = "The movie"


# ---- the estimator ---------------------------------------------------------------------------
def test_antithetic_estimate_of_a_linear_and_a_quadratic_function():
    """E[g] = grad f exactly for a quadratic f (the antithetic pairs cancel its even part);
    with 40,000 pairs the estimate is within a few standard errors of it."""
    g = torch.Generator().manual_seed(0)
    batch, dim, pairs, sigma = 2, 3, 40_000, 0.3
    x = torch.randn(batch, dim, generator=g)
    a = torch.randn(batch, dim, generator=g)
    m = torch.randn(dim, dim, generator=g)
    hess = m @ m.T  # symmetric

    def quadratic(points):  # [2P, B, d] -> [2P, B]
        return (points * a).sum(-1) + 0.5 * torch.einsum("qbi,ij,qbj->qb", points, hess, points)

    u = torch.randn(pairs, batch, dim, generator=g)
    want = a + x @ hess
    got = antithetic_gradient(quadratic, x, u, sigma)
    # per pair the estimate is (a + H x) . u u: its spread is about |a + H x| per element
    se = want.norm(dim=-1, keepdim=True) / pairs**0.5
    assert torch.all((got - want).abs() < 5 * se), (got, want)
    linear = antithetic_gradient(lambda p: (p * a).sum(-1), x, u, sigma)
    assert torch.all((linear - a).abs() < 5 * a.norm(dim=-1, keepdim=True) / pairs**0.5)
    # one pair along a coordinate of a linear function: exactly that coordinate
    e0 = torch.zeros(1, batch, dim)
    e0[..., 0] = 1.0
    one = antithetic_gradient(lambda p: (p * a).sum(-1), x, e0, sigma)
    torch.testing.assert_close(one[:, 0], a[:, 0])


def test_rounding_among_the_nearest_tokens_is_the_full_rounding_near_the_estimate(tiny_base):
    """With every token a candidate, round_among is round_to_vocab; with a shortlist of the
    estimate's nearest tokens it still is for small perturbations."""
    from fastdia import ops

    space = tiny_base.space
    bias = space.rounding_bias("l2")
    g = torch.Generator().manual_seed(1)
    x = space.embed(torch.randint(0, space.vocab_size, (2, 3), generator=g))
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    points = x[None] + 0.5 * torch.randn((4, *x.shape), generator=g)
    full = ops.round_to_vocab(points, space.weight, bias, backend="reference")
    every = torch.arange(space.vocab_size).expand(2, 3, -1)
    got = round_among(points, every, space.weight[every], bias[every])
    assert torch.equal(got, full)
    near = nearest_tokens(x, space.weight, bias, SHORTLIST)
    assert near.shape == (2, 3, SHORTLIST)
    small = x[None] + 0.01 * torch.randn((4, *x.shape), generator=g)
    want = ops.round_to_vocab(small, space.weight, bias, backend="reference")
    assert torch.equal(round_among(small, near, space.weight[near], bias[near]), want)


def test_a_rows_directions_do_not_depend_on_its_batch():
    alone = step_directions([7], 2, 5, 3, (4, 6))
    shared = step_directions([1, 7, 9], 2, 5, 3, (4, 6))
    assert shared.shape == (3, 3, 4, 6)
    torch.testing.assert_close(shared[:, 1], alone[:, 0])
    assert not torch.equal(step_directions([7], 2, 6, 3, (4, 6)), alone)  # fresh per step


# ---- the sampler -----------------------------------------------------------------------------
def _zo_sampler(tiny_base, reward, *, guidance=50.0, samples=4):
    """A "tokens" denoiser (its x0 estimate an expected embedding, as trained ones are)
    under zeroth-order guidance with the nearest decode."""
    space = tiny_base.space
    torch.manual_seed(0)
    config = DenoiserConfig(
        dim=space.dim,
        max_length=32,
        hidden=32,
        layers=1,
        heads=2,
        prediction="tokens",
        vocab_size=space.vocab_size,
    )
    denoiser = Denoiser(config, torch.arange(space.vocab_size)).eval().bind_embeddings(space)
    cfg = SamplerConfig(
        steps=6,
        guidance=guidance,
        decode="nearest",
        on_eos="mask",
        block_size=4,
        guidance_estimator="zo",
        zo_samples=samples,
        zo_sigma=1.0,
    )
    return Sampler(denoiser, tiny_base.space, [], cfg, base_model=tiny_base, reward=reward)


def test_zo_scores_q_candidates_per_row_and_step_and_keeps_rows_apart(tiny_base):
    calls = []

    def reward(texts):
        calls.append(len(texts))
        return [float(t.count("e")) for t in texts]

    sampler = _zo_sampler(tiny_base, reward)
    out = sampler.sample(3, 8, prompt=PROMPT, seed=11)
    steps = len(sampler.plan(3, 8, prompt_tokens=2).diffusion.table)
    assert calls == [4 * 3] * (2 * steps)  # Q x B texts per step, two blocks
    again = sampler.sample(3, 8, prompt=PROMPT, seed=11)
    assert torch.equal(out.tokens, again.tokens)
    alone = sampler.sample(1, 8, prompt=PROMPT, seed=12)
    assert torch.equal(alone.tokens[0], out.tokens[1])  # row 1 has seed 12
    assert out.paths["diffusion_graph"] is False


def test_the_step_reads_the_estimate_of_the_candidates_rewards(tiny_base):
    """What the guided step receives as its gradient at the first step: the antithetic
    estimate from the rounded candidates' rewards (recomputed here from the same x0
    estimate, directions and reward), at the block's positions only."""
    space = tiny_base.space

    def reward(texts):
        return [float(sum(t[len(PROMPT) :].count(c) for c in "aeiou")) for t in texts]

    sampler = _zo_sampler(tiny_base, reward, samples=6)
    plan = sampler.plan(2, 4, prompt_tokens=2)
    diffusion = plan.diffusion
    seen = []
    step = diffusion._guided_step

    def spy(*args, **kwargs):
        if kwargs.get("grad") is not None:
            seen.append((args[1].clone(), kwargs["grad"].clone()))
        return step(*args, **kwargs)

    diffusion._guided_step = spy
    plan.run(PROMPT, seed=4)
    x0, grad = seen[0]  # the first row: an x0-taking denoiser hands the step its x0
    dim = space.dim
    x0, grad = x0.view(2, -1, dim), grad.view(2, -1, dim)
    at = diffusion._at_block
    block = x0.gather(1, at)
    u = step_directions(plan.state.seeds.tolist(), 0, 0, 3, tuple(block.shape[1:]))
    prompt = space.encode(PROMPT)

    near = nearest_tokens(block, space.weight, diffusion.bias, SHORTLIST)
    bias = diffusion.bias[near]

    def rewards(points):
        ids = round_among(points, near, space.weight[near], bias).tolist()
        texts = [space.decode(prompt + row[b]) for row in ids for b in range(2)]
        return torch.tensor(reward(texts)).view(points.shape[0], 2)

    want = antithetic_gradient(rewards, block, u, 1.0)
    assert want.abs().sum() > 0  # the candidates' rewards differ: a real signal
    torch.testing.assert_close(grad.gather(1, at), want)
    outside = torch.ones(grad.shape[:2], dtype=torch.bool)
    outside.scatter_(1, at[..., 0], False)
    assert grad[outside].abs().max() == 0


@pytest.mark.parametrize(
    ("estimator", "samples", "sigma", "message"),
    [
        ("grad", 8, 1.0, "guidance_estimator must be one of critic, zo"),
        ("zo", 3, 1.0, "even integer >= 2"),
        ("zo", 0, 1.0, "even integer >= 2"),
        ("zo", 8, 0.0, "zo_sigma must be a finite number > 0"),
        ("zo", 8, float("inf"), "zo_sigma must be a finite number > 0"),
    ],
)
def test_bad_zero_order_settings(estimator, samples, sigma, message):
    with pytest.raises(ConfigError, match=message):
        check_zero_order(estimator, samples, sigma)
    with pytest.raises(ConfigError, match=message):
        SamplerConfig(guidance_estimator=estimator, zo_samples=samples, zo_sigma=sigma)


def test_zo_needs_a_reward_and_a_latent_and_no_critic_reader(tiny_base, tiny_models):
    denoiser, _ = tiny_models
    with pytest.raises(ConfigError, match="adaptive noise and critic_kind='value'"):
        SamplerConfig(guidance_estimator="zo", noise_kappa=1.0)
    with pytest.raises(ConfigError, match="pass reward="):
        Sampler(denoiser, tiny_base.space, [], SamplerConfig(guidance_estimator="zo"))
    from fastdia.decode import DecodeConfig

    cfg = SamplerConfig(guidance_estimator="zo", decode="lm", lm=DecodeConfig(latent_weight=0))
    with pytest.raises(ConfigError, match="no diffusion runs"):
        Sampler(denoiser, tiny_base.space, [], cfg, base_model=tiny_base, reward=len)


def test_zo_from_the_command_line_with_a_reward_no_critic_imitates(capsys, tiny_model_dir):
    argv = ["sample", "--base-model", str(tiny_model_dir), "--random-init", "--steps", "2"]
    argv += ["--new-tokens", "4", "--block-size", "2", "--prompt", PROMPT, "--json"]
    argv += ["--num-samples", "2", "--reward", "keyword:the", "--guidance", "5"]
    argv += ["--guidance-estimator", "zo"]
    assert main([*argv, "--zo-samples", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "summary" in json.loads(lines[-1])
    assert main([*argv, "--zo-samples", "3"]) == 2
    assert "even integer" in capsys.readouterr().err
