"""The reference sampler end to end on tiny models."""

from __future__ import annotations

import pytest
import torch

from fastdia.errors import ConfigError
from fastdia.models.critic import CriticConfig, build_critic
from fastdia.sampler import Sampler, SamplerConfig, WeightedCritic


def _sampler(tiny_base, tiny_models, **kw):
    denoiser, critic = tiny_models
    critics = kw.pop("critics", [WeightedCritic("sentiment", critic, 1.0)])
    return Sampler(denoiser, tiny_base.space, critics, SamplerConfig(**kw))


def test_config_defaults_are_the_settings_table():
    """SamplerConfig and DecodeConfig take their defaults from the one table of sampling
    settings (fastdia.settings), so a bare config samples as the CLI's built-in defaults."""
    from fastdia.decode import DecodeConfig
    from fastdia.pipeline import sampler_config
    from fastdia.settings import SAMPLING_KEYS

    built = sampler_config({k: spec.default for k, spec in SAMPLING_KEYS.items()})
    assert built == SamplerConfig()
    assert built.guidance == SAMPLING_KEYS["guidance"].default == 1.0
    assert DecodeConfig() == built.lm


def test_every_sampling_setting_reaches_the_config():
    """Each key of the settings table, set away from its default (with the settings it
    needs), changes the config sampler_config builds: none is dropped on the way."""
    from fastdia.pipeline import sampler_config
    from fastdia.settings import SAMPLING_KEYS

    needs = {"decode": "lm", "stop_at": 0.5, "particles": 2}
    other = {
        "guidance": 3.0,
        "steps": 7,
        "sampler": "ddim",
        "decode": "lm",
        "stop_at": 0.25,
        "score_temperature": 0.5,
        "lm_temperature": 0.7,
        "latent_weight": 0.3,
        "tilt": 0.2,
        "tilt_once": True,
        "tilt_horizon": 5,
        "block_size": 4,
        "on_eos": "mask",
        "critic_kind": "value",
        "adaptive_noise": 1.0,
        "particles": 4,
        "ess_threshold": 0.25,
        "smc_twist": "reward",
        "smc_reward_weight": 2.0,
        "guidance_estimator": "zo",
        "zo_samples": 4,
        "zo_sigma": 0.5,
        "corrector_steps": 1,
        "corrector_snr": 0.3,
        "mh_steps": 2,
        "mh_snr": 0.3,
    }
    assert set(other) == set(SAMPLING_KEYS), "a new sampling key needs a value here"
    defaults = {k: spec.default for k, spec in SAMPLING_KEYS.items()}
    for key, value in other.items():
        base = defaults | needs | ({"smc_reward_weight": 1.0} if key == "smc_twist" else {})
        if key in ("decode", "adaptive_noise"):
            base = defaults | {"stop_at": 0.5}
        before = sampler_config(base)
        after = sampler_config(base | {key: value})
        assert after != before, key


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dia"])
def test_same_seed_same_output_and_seeds_differ(tiny_base, tiny_models, sampler):
    s = _sampler(tiny_base, tiny_models, sampler=sampler, steps=6, guidance=1.0)
    a = s.sample(3, 12, prompt="The movie was", seed=5)
    b = s.sample(3, 12, prompt="The movie was", seed=5)
    c = s.sample(3, 12, prompt="The movie was", seed=6)
    p = len(tiny_base.space.encode("The movie was"))
    assert a.tokens.shape == (3, 12) and a.tokens.dtype == torch.int64
    assert a.token_ids.shape == (3, p + 12) and torch.equal(a.token_ids[:, p:], a.tokens)
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.z, b.z)
    assert not torch.equal(a.z, c.z)
    assert len(a.texts) == 3 and all(t.startswith("The movie was") for t in a.texts)
    assert set(a.critic_values) == {"sentiment"} and a.critic_values["sentiment"].shape == (3,)
    assert a.steps == 6 and a.seconds > 0 and a.blocks == 1


def test_plan_is_reusable_and_prompt_positions_are_exact(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, steps=5, window=16, block_size=8)
    prompt = tiny_base.space.encode("I love this film")
    plan = s.plan(2, 8, prompt_tokens=len(prompt))
    out1 = plan.run(prompt, seed=1)
    out2 = plan.run(None, seed=1)
    out3 = plan.run(prompt, seed=1)
    p = len(prompt)
    assert out1.prompt_ids == [prompt, prompt] and out2.prompt_ids == [[], []]
    assert torch.equal(out1.tokens, out3.tokens)
    assert not torch.equal(out1.tokens, out2.tokens)
    # the final state at the context positions is the clean scaled embedding of the prompt's
    # last W - K = 8 tokens
    c = min(p, 8)
    expected = tiny_base.space.embed(torch.tensor(prompt[-c:]))
    torch.testing.assert_close(out1.z[0, :c], expected)


def test_initial_noise_and_first_step_follow_the_counter(tiny_base, tiny_models):
    """With no critic and a one-step ddim run, the output is a z_T + b eps(z_T) where
    z_T is exactly the Philox noise of (seed, step 0)."""
    from fastdia import noise
    from fastdia.schedules import coefficient_table

    denoiser, _ = tiny_models
    config = SamplerConfig(sampler="ddim", steps=1, window=4, block_size=4)
    s = Sampler(denoiser, tiny_base.space, [], config)
    out = s.sample(2, 4, seed=9)
    dim = tiny_base.space.dim
    # each row draws under its own seed (9 + row), its elements numbered from 0
    z_t = torch.stack([noise.randn(9 + b, 0, 4 * dim).view(4, dim) for b in range(2)])
    a, b, _, _ = coefficient_table(denoiser.config.schedule, "ddim", 1).coef[0].tolist()
    with torch.no_grad():
        expected = a * z_t + b * denoiser(z_t, 1.0)
    # the plan precomputes the time embeddings of all rows in one batch: float rounding
    torch.testing.assert_close(out.z, expected, rtol=1e-5, atol=2e-4)


def test_guidance_raises_the_critic_value(tiny_base, tiny_models):
    """Guidance follows the critic's gradient: the critic of the final continuous state
    rises with lambda (same seed, same noise)."""
    _, critic = tiny_models
    values = []
    for lam in (0.0, 20.0, 80.0):
        s = _sampler(tiny_base, tiny_models, sampler="ddpm", steps=8, guidance=lam)
        out = s.sample(8, 10, seed=3)
        with torch.no_grad():
            values.append(critic(out.z, 0.0).mean().item())
    assert values[0] < values[1] < values[2]


def test_context_critics_and_corrector_and_clamp_run(tiny_base, tiny_models):
    _, critic = tiny_models
    torch.manual_seed(0)
    ctx = build_critic(
        CriticConfig(
            dim=tiny_base.space.dim, kind="context", hidden=16, heads=2, layers=1, reward="nontoxic"
        )
    )
    critics = [WeightedCritic("sentiment", critic, 1.0), WeightedCritic("nontoxic", ctx, 0.5)]
    s = _sampler(
        tiny_base,
        tiny_models,
        critics=critics,
        steps=4,
        guidance=2.0,
        clamp_from=3,
        corrector_steps=2,
        noise_kappa=0.3,
    )
    out = s.sample(2, 8, prompt="The food", seed=0)
    assert out.steps == 4 + 2 * 3
    assert set(out.critic_values) == {"sentiment", "nontoxic"}
    again = s.sample(2, 8, prompt="The food", seed=0)
    assert torch.equal(out.token_ids, again.token_ids)


def test_clamped_final_state_is_made_of_embeddings(tiny_base, tiny_models):
    """Clamping at the last step with ddim, unguided: z_0 = x0 estimate = c E[ids]."""
    s = _sampler(
        tiny_base, tiny_models, sampler="ddim", steps=4, clamp_from=4, window=6, guidance=0.0
    )
    assert s.block_size == 3  # half the window by default
    out = s.sample(2, 3, seed=0)
    # the whole window is clamped: its first K positions are the block's tokens
    torch.testing.assert_close(out.z[:, :3], tiny_base.space.embed(out.tokens), rtol=0, atol=1e-3)


def test_x0_prediction_denoiser(tiny_base):
    from fastdia.models.denoiser import Denoiser, DenoiserConfig

    torch.manual_seed(0)
    den = Denoiser(
        DenoiserConfig(
            dim=tiny_base.space.dim, max_length=16, hidden=16, layers=1, heads=2, prediction="x0"
        )
    ).eval()
    s = Sampler(den, tiny_base.space, [], SamplerConfig(sampler="ddim", steps=1, window=5))
    out = s.sample(1, 2, seed=0)
    # one ddim step from t=1 to clean data returns the x0 prediction itself
    with torch.no_grad():
        from fastdia import noise

        z_t = noise.randn(0, 0, 5 * tiny_base.space.dim).view(1, 5, -1)
        torch.testing.assert_close(out.z, den(z_t, 1.0), rtol=1e-3, atol=1e-3)


def test_bad_input(tiny_base, tiny_models):
    s = _sampler(tiny_base, tiny_models, steps=2)
    with pytest.raises(ConfigError, match="prompt is empty"):
        s.sample(1, 8, prompt="  ")
    with pytest.raises(ConfigError, match="exceeds the denoiser's maximum of 32"):
        _sampler(tiny_base, tiny_models, steps=2, window=33)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        s.sample(1, 8, seed=-1)
    for kw, msg in [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"guidance": float("nan")}, "finite number"),
        ({"guidance": -1.0}, "negative weight"),
        ({"sampler": "euler"}, "known: ddpm, ddim, dia"),
        ({"clamp_from": 9, "steps": 3}, "clamp_from"),
        ({"backend": "magic"}, "known: auto, reference"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            _sampler(tiny_base, tiny_models, **kw)
