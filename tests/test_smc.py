"""Twisted SMC over blocks (fastdia.smc): the resampling math by hand, the row gather
against an unresampled run, and exactness on a target small enough to enumerate."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from fastdia.cli import main
from fastdia.decode import DecodeConfig, token_values
from fastdia.errors import ConfigError
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic
from fastdia.smc import (
    Particles,
    check_particles,
    child_seed,
    effective_sample_size,
    systematic_resample,
)

PROMPT = "The movie"
T, TILT, GUIDANCE, WINDOW = 0.8, 4.0, 8.0, 8  # beta = tilt x guidance / window = 4


# ---- the math -------------------------------------------------------------------------------
def test_effective_sample_size_by_hand():
    log_w = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0, 0]]))
    # (sum w)^2 / sum w^2: 16/4, 1/1, 16/10
    torch.testing.assert_close(
        effective_sample_size(log_w), torch.tensor([4.0, 1.0, 1.6], dtype=torch.float64)
    )


def test_systematic_resampling_by_hand():
    log_w = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]]))
    # cumulative 0.1 0.3 0.6 1.0; points (k + 0.5) / 4 = 0.125 0.375 0.625 0.875
    got = systematic_resample(log_w, torch.tensor([0.5, 0.99]))
    assert got.tolist() == [[1, 2, 3, 3], [2, 2, 2, 2]]
    # u = 0: points 0, 0.25, 0.5, 0.75 (a point on a boundary takes the next parent)
    assert systematic_resample(log_w[:1], torch.tensor([0.0])).tolist() == [[0, 1, 2, 3]]


def test_particles_resample_under_the_threshold_and_keep_log_z():
    log_w = torch.zeros(4, dtype=torch.float64)
    particles = Particles.start(log_w, 2, 0.9)
    assert particles.groups == 2
    log_w += torch.log(torch.tensor([1.0, 1.0, 4.0, 0.0], dtype=torch.float64).clamp(min=1e-300))
    seeds = [10, 11, 20, 21]
    parents = particles.step(0, seeds)
    # group 0: ESS 2 (kept); group 1: ESS 1 < 1.8, resampled onto its first row
    assert parents is not None and parents.tolist() == [0, 1, 2, 2]
    assert particles.resampled == [[False, True]]
    assert particles.ess[0] == pytest.approx([2.0, 1.0])
    # log Z of group 1: log mean(4, 0) = log 2; group 0 not yet counted
    assert particles.log_z.tolist() == pytest.approx([0.0, math.log(2.0)])
    assert log_w.tolist()[2:] == [0.0, 0.0] and log_w.tolist()[:2] == [0.0, 0.0]
    log_w += torch.log(torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert particles.step(1, seeds, final=True) is not None
    assert particles.log_z.tolist() == pytest.approx([math.log(2.0), math.log(2.0)])
    assert particles.resampled[-1] == [True, True]
    assert len({child_seed(5, row, 0) for row in range(8)}) == 8


@pytest.mark.parametrize(
    ("particles", "threshold", "message"),
    [
        (0, 0.5, "particles must be"),
        (2.5, 0.5, "particles must be"),
        (2, 0.0, r"\(0, 1\]"),
        (2, 1.5, r"\(0, 1\]"),
    ],
)
def test_bad_smc_settings(particles, threshold, message):
    with pytest.raises(ConfigError, match=message):
        check_particles(particles, threshold)
    with pytest.raises(ConfigError, match=message):
        SamplerConfig(decode="lm", stop_at=0.5, particles=particles, ess_threshold=threshold)


def test_smc_needs_the_lm_decode_and_one_prompt_per_group(tiny_base, tiny_models):
    with pytest.raises(ConfigError, match="decode='lm'"):
        SamplerConfig(particles=2)
    s = _sampler(tiny_base, tiny_models, particles=2, latent_weight=0.0)
    with pytest.raises(ConfigError, match="multiple of 2"):
        s.plan(3, 2).run(PROMPT)
    with pytest.raises(ConfigError, match="must share one prompt"):
        s.plan(4, 2).run(["a", "a", "b", "c"])
    out = s.plan(4, 2).run(["a", "a", "b", "b"], seed=1)
    assert out.smc is not None and len(out.smc["log_z"]) == 2 and len(out.smc["ess"]) == 2
    assert out.paths["smc_particles"] == 2


# ---- the gather -----------------------------------------------------------------------------
def test_a_resampled_row_continues_exactly_as_its_parent(tiny_base, tiny_models):
    """Row 0 made a copy of row 1 after the first block (tokens, KV cache, hidden state,
    seed) writes row 1's second block: the gather leaves nothing of row 0 behind."""
    s = _sampler(tiny_base, tiny_models, particles=1, latent_weight=0.3)
    plan = s.plan(2, 2, prompt_tokens=4)
    rows = [s.encode("My day was"), s.encode("The movie")]
    plan.set_inputs(rows, [5, 9])
    plan.generate(2)
    alone = plan.state.tokens[:, plan.prompt_cap :].clone()
    plan.set_inputs(rows, [5, 9])
    plan.decode_plan.start()
    plan.diffusion.denoise()
    plan.decode_plan.decode_tokens(1)
    plan.decode_plan.reorder(torch.tensor([1, 1]))
    plan.state.seeds.copy_(torch.tensor([9, 9]))
    plan.diffusion.denoise()
    plan.decode_plan.decode_tokens(1)
    copied = plan.state.tokens[:, plan.prompt_cap :]
    assert torch.equal(copied[0], alone[1]) and torch.equal(copied[1], alone[1])
    assert not torch.equal(alone[0], alone[1])


# ---- exactness on an enumerable target ------------------------------------------------------
def _sampler(tiny_base, tiny_models, *, particles, latent_weight):
    denoiser, critic = tiny_models
    cfg = SamplerConfig(
        steps=3,
        guidance=GUIDANCE,
        decode="lm",
        stop_at=0.6,
        on_eos="mask",
        block_size=1,
        window=WINDOW,
        lm=DecodeConfig(temperature=T, latent_weight=latent_weight, tilt=TILT),
        particles=particles,
    )
    return Sampler(
        denoiser, tiny_base.space, [WeightedCritic("sentiment", critic)], cfg, base_model=tiny_base
    )


def _log_p_two_tokens(tiny_base, banned):
    """log p_T(x1) ``[V]`` and log p_T(x2 | x1) ``[V, V]`` after the prompt (banned ids out)."""
    space, model = tiny_base.space, tiny_base.model
    prompt = space.encode(PROMPT)
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].float() / T
        pairs = torch.tensor([[*prompt, v] for v in range(space.vocab_size)])
        second = model(pairs).logits[:, -1].float() / T
    first[banned], second[:, banned] = -math.inf, -math.inf
    return torch.log_softmax(first, -1), torch.log_softmax(second, -1)


def _exact(tiny_base, tiny_models, banned):
    """log Z and E_pi[u(x1) + u(x2)] of pi(x1 x2) ∝ prod p_T(x_i | .) exp(beta u(x_i)), by
    enumerating every two-token continuation of the prompt."""
    _, critic = tiny_models
    space = tiny_base.space
    u = token_values([(critic, 1.0)], space.weight, space.scale)
    beta = TILT * GUIDANCE / WINDOW
    first, second = _log_p_two_tokens(tiny_base, banned)
    log_pi = (first + beta * u)[:, None] + second + beta * u[None, :]
    log_z = torch.logsumexp(log_pi.flatten(), 0)
    f = u[:, None] + u[None, :]
    return log_z.item(), float((torch.exp(log_pi - log_z) * f).sum()), u


def _runs(sampler, rows, runs, u):
    """Per run: the mean of u(x1) + u(x2) over its rows, and exp(log Z) of SMC's estimate."""
    plan = sampler.plan(rows, 2, prompt_tokens=4)
    means, z = [], []
    for r in range(runs):
        out = plan.run(PROMPT, seed=1000 * r + 7)
        means.append(float((u[out.tokens[:, 0]] + u[out.tokens[:, 1]]).mean()))
        if out.smc is not None:
            z.append(math.exp(out.smc["log_z"][0]))
    return means, z


def _mean_se(values):
    return statistics.mean(values), statistics.pstdev(values) / len(values) ** 0.5


def test_smc_corrects_the_decode_toward_the_exact_tilted_target(tiny_base, tiny_models):
    """The decode with a latent is a biased sampler of the tilted target; SMC over its
    draws (32 particles, 40 independent runs) estimates the target's expectation within
    its error, where the plain decode (same rows) misses by many standard errors."""
    plain_sampler = _sampler(tiny_base, tiny_models, particles=1, latent_weight=0.006)
    _, expected, u = _exact(tiny_base, tiny_models, list(plain_sampler.special.banned))
    plain, plain_se = _mean_se(_runs(plain_sampler, 16, 40, u)[0])
    smc, smc_se = _mean_se(
        _runs(_sampler(tiny_base, tiny_models, particles=32, latent_weight=0.006), 32, 40, u)[0]
    )
    assert abs(smc - expected) < 3.5 * smc_se, (smc, smc_se, expected)
    assert abs(plain - expected) > 6 * plain_se and abs(plain - expected) > abs(smc - expected)


def test_smc_error_shrinks_with_particles(tiny_base, tiny_models):
    """The same check at 1, 2, 4 and 8 particles (32 rows x 40 runs each): the error of the
    tilted expectation falls from many standard errors (1 particle: the plain decode) to
    within its error from 4 particles on (measured: -0.12, -0.05, +0.02, +0.02; standard
    errors 0.009 to 0.02, growing with P as a group's rows share ancestors)."""
    sampler = _sampler(tiny_base, tiny_models, particles=1, latent_weight=0.006)
    _, expected, u = _exact(tiny_base, tiny_models, list(sampler.special.banned))
    errors = {}
    for particles in (1, 2, 4, 8):
        runs = _runs(
            _sampler(tiny_base, tiny_models, particles=particles, latent_weight=0.006), 32, 40, u
        )
        mean, se = _mean_se(runs[0])
        errors[particles] = (abs(mean - expected), se)
    assert errors[1][0] > 6 * errors[1][1]
    assert errors[2][0] < errors[1][0]
    for particles in (4, 8):
        assert errors[particles][0] < 3 * errors[particles][1], errors
        assert errors[particles][0] < errors[1][0] / 2, errors


def test_smc_log_normalising_constant_is_unbiased(tiny_base, tiny_models):
    sampler = _sampler(tiny_base, tiny_models, particles=32, latent_weight=0.002)
    log_z, _, u = _exact(tiny_base, tiny_models, list(sampler.special.banned))
    z, se = _mean_se(_runs(sampler, 32, 40, u)[1])
    assert abs(z - math.exp(log_z)) < 3 * se, (z, se, math.exp(log_z))
    # without a latent the proposal is the target's per-token conditional: Z to rounding
    exact_proposal = _sampler(tiny_base, tiny_models, particles=8, latent_weight=0.0)
    z0 = _runs(exact_proposal, 8, 3, u)[1]
    assert z0 == pytest.approx([math.exp(log_z)] * 3, rel=0.25)


# ---- the command line -------------------------------------------------------------------------
def test_sample_with_particles_from_the_command_line(capsys, tiny_model_dir):
    argv = ["sample", "--base-model", str(tiny_model_dir), "--random-init", "--steps", "2"]
    argv += ["--decode", "lm", "--stop-at", "0.5", "--new-tokens", "4", "--on-eos", "mask"]
    argv += ["--block-size", "2", "--prompt", PROMPT, "--json"]
    assert main([*argv, "--particles", "4", "--num-samples", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    summary = lines[-1]["summary"]
    assert len(lines) == 5 and summary["smc"]["batches"][0]["particles"] == 4
    assert len(summary["smc"]["batches"][0]["ess"]) == 2  # one per block
    assert main([*argv, "--particles", "3", "--num-samples", "4"]) == 2
    assert "must be multiples of it" in capsys.readouterr().err
    assert main([*argv, "--particles", "4", "--decode", "nearest", "--num-samples", "4"]) == 2


def test_the_generator_refuses_particles(tiny_model_dir):
    from fastdia.generate import Generator

    with pytest.raises(ConfigError, match="one row per request"):
        Generator(
            base_model=str(tiny_model_dir),
            random_init=True,
            settings={"decode": "lm", "stop_at": 0.5, "particles": 2},
        )


# ---- the true reward: its final weighting and the reward twist --------------------------------
W_REWARD = 2.0


def _reward(texts):
    """A black-box reward of the text (no critic imitates it): its length mod 5, over 4."""
    return [(len(t) % 5) / 4.0 for t in texts]


def _reward_sampler(tiny_base, tiny_models, *, twist, particles=16, weight=W_REWARD):
    """SMC toward p_T(x) exp(W r(x)): the reward twist steers with no critic at all; the
    critic twist steers by the critic's tilt and lets the last weighting read r."""
    denoiser, critic = tiny_models
    critics = [WeightedCritic("sentiment", critic)] if twist == "critic" else []
    cfg = SamplerConfig(
        steps=3,
        guidance=GUIDANCE if twist == "critic" else 0.0,
        decode="lm",
        on_eos="mask",
        block_size=1,
        window=WINDOW,
        lm=DecodeConfig(temperature=T, latent_weight=0.0, tilt=TILT),
        particles=particles,
        smc_twist=twist,
        smc_reward_weight=weight,
    )
    return Sampler(denoiser, tiny_base.space, critics, cfg, base_model=tiny_base, reward=_reward)


def _exact_reward(tiny_base, banned):
    """log Z and E_pi[r] of pi(x1 x2) ∝ p_T(x1 x2) exp(W r(prompt x1 x2)), enumerated."""
    space = tiny_base.space
    prompt = space.encode(PROMPT)
    first, second = _log_p_two_tokens(tiny_base, banned)
    log_p = first[:, None] + second
    vocab = space.vocab_size
    texts = [space.decode([*prompt, a, b]) for a in range(vocab) for b in range(vocab)]
    r = torch.tensor(_reward(texts)).view(vocab, vocab)
    log_pi = log_p + W_REWARD * r
    log_z = torch.logsumexp(log_pi.flatten(), 0)
    return log_z.item(), float((torch.exp(log_pi - log_z) * r).sum())


def _reward_runs(sampler, rows, runs):
    plan = sampler.plan(rows, 2, prompt_tokens=4)
    means, z = [], []
    for r in range(runs):
        out = plan.run(PROMPT, seed=1000 * r + 3)
        means.append(statistics.mean(_reward(out.texts)))
        if out.smc is not None:
            z.append(math.exp(out.smc["log_z"][0]))
    return means, z


@pytest.mark.parametrize("twist", ["reward", "critic"])
def test_smc_with_the_true_reward_targets_the_reward_tilted_base_model(
    tiny_base, tiny_models, twist
):
    """Both twists end at p_T(x) exp(W r(x)) for a reward no critic imitates: SMC's mean
    reward (16 particles, 30 runs) is the enumerated target's within its error, its log Z
    estimate unbiased; the same decode without the reward weighting misses by far."""
    sampler = _reward_sampler(tiny_base, tiny_models, twist=twist)
    log_z, expected = _exact_reward(tiny_base, list(sampler.special.banned))
    means, z = _reward_runs(sampler, 16, 30)
    mean, se = _mean_se(means)
    assert abs(mean - expected) < 3.5 * se, (mean, se, expected)
    z_mean, z_se = _mean_se(z)
    assert abs(z_mean - math.exp(log_z)) < 3.5 * z_se, (z_mean, z_se, math.exp(log_z))
    plain = _reward_sampler(tiny_base, tiny_models, twist="critic", particles=1, weight=0.0)
    plain_mean, plain_se = _mean_se(_reward_runs(plain, 16, 30)[0])
    assert abs(plain_mean - expected) > 6 * plain_se, (plain_mean, plain_se, expected)
    out = sampler.plan(16, 2, prompt_tokens=4).run(PROMPT, seed=1)
    assert out.smc["twist"] == twist and out.smc["reward_weight"] == W_REWARD


@pytest.mark.parametrize(
    ("twist", "weight", "particles", "message"),
    [
        ("value", 1.0, 4, "smc_twist must be one of critic, reward"),
        ("critic", -1.0, 4, "smc_reward_weight must be a finite number >= 0"),
        ("critic", math.nan, 4, "smc_reward_weight must be a finite number >= 0"),
        ("reward", 0.0, 4, "give W > 0"),
        ("critic", 1.0, 1, "give particles >= 2"),
        ("reward", 1.0, 1, "give particles >= 2"),
    ],
)
def test_bad_smc_reward_settings(twist, weight, particles, message):
    with pytest.raises(ConfigError, match=message):
        SamplerConfig(
            decode="lm",
            stop_at=0.5,
            particles=particles,
            smc_twist=twist,
            smc_reward_weight=weight,
        )


def test_a_reward_that_misbehaves_is_named_with_its_row(tiny_base, tiny_models):
    from fastdia.smc import score_texts

    texts = ["a", "b", "c"]
    assert score_texts(lambda t: [1, 2, 3], texts, "mine").tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="reward 'mine' returned 2 scores for 3 texts"):
        score_texts(lambda t: [1.0, 2.0], texts, "mine")
    with pytest.raises(ConfigError, match="reward 'mine' scored row 1 as nan"):
        score_texts(lambda t: torch.tensor([0.0, math.nan, 1.0]), texts, "mine")
    with pytest.raises(ConfigError, match="reward 'mine' must return one number per text"):
        score_texts(lambda t: "high", texts, "mine")
    denoiser, _ = tiny_models
    cfg = SamplerConfig(
        guidance=0.0,
        decode="lm",
        lm=DecodeConfig(latent_weight=0.0),
        particles=2,
        smc_twist="reward",
        smc_reward_weight=1.0,
    )
    with pytest.raises(ConfigError, match="pass reward="):
        Sampler(denoiser, tiny_base.space, [], cfg, base_model=tiny_base)
    bad = Sampler(
        denoiser,
        tiny_base.space,
        [],
        cfg,
        base_model=tiny_base,
        reward=lambda t: [math.inf] * len(t),
        reward_name="inf-reward",
    )
    with pytest.raises(ConfigError, match="reward 'inf-reward' scored row 0 as inf"):
        bad.sample(2, 2, prompt=PROMPT)


def test_a_reward_with_no_critic_steers_smc_from_the_command_line(capsys, tiny_model_dir):
    """keyword: has no critic in any checkpoint: at guidance 0 the reward twist runs it."""
    argv = ["sample", "--base-model", str(tiny_model_dir), "--random-init", "--steps", "2"]
    argv += ["--decode", "lm", "--latent-weight", "0", "--new-tokens", "4", "--on-eos", "mask"]
    argv += ["--block-size", "2", "--prompt", PROMPT, "--json", "--num-samples", "4"]
    argv += ["--reward", "keyword:the", "--guidance", "0", "--particles", "4"]
    assert main([*argv, "--smc-twist", "reward", "--smc-reward-weight", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    batch = summary["smc"]["batches"][0]
    assert batch["twist"] == "reward" and batch["reward_weight"] == 3.0
    assert main([*argv, "--smc-twist", "reward"]) == 2
    assert "give W > 0" in capsys.readouterr().err
